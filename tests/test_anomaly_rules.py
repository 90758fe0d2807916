"""promtool tests of scripts/prometheus/conveyor-anomalies.yml on generated days of traffic.

A day of Conveyor traffic is a sinusoid (quiet at 04:00, busy at 16:00) with noise on every
minute: jobs per minute, failures, run time and batch size all move with the load. Each case is
written as a promtool test file (counters as Prometheus would scrape them, one sample a minute)
and run with `promtool test rules`:

- a normal day, 10 % busier than the day before, with noise: no alert at any of its minutes
  checked (every 10 minutes);
- the same day with an injected anomaly per signal (failure ratio 25 %, batches of 1,
  throughput down to 30 %, run time x3), each at another hour: each alert fires inside its own
  window and nowhere else;
- guards: a low-traffic type whose every job fails for an hour, and a perfectly flat type
  (baseline stddev 0) that moves by 2 %: both stay quiet;
- the weekly baseline: a week whose weekend is at 40 % load; the next weekend day is compared
  with last week's (quiet, where yesterday's would have alarmed) and a real drop on it fires.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from test_exporter_prometheus import RULES_DIR, _tool

ANOMALY_RULES = RULES_DIR / "conveyor-anomalies.yml"
DAY = 1440  # minutes
ALERTS = {
    "ConveyorThroughputAnomalyLow": "warning",
    "ConveyorLatencyAnomalyHigh": "warning",
    "ConveyorFailureRatioAnomalyHigh": "warning",
    "ConveyorBatchSizeAnomalyLow": "info",
}
DESCRIPTIONS = {
    "ConveyorThroughputAnomalyLow": (
        "{t} throughput is unusually low",
        "{t} jobs finish over 3 standard deviations below their usual rate for this hour "
        "(job_type:conveyor_jobs:rate5m:zscore).",
    ),
    "ConveyorLatencyAnomalyHigh": (
        "{t} jobs run unusually slowly",
        "{t}'s mean run time is over 3 standard deviations above its usual for this hour "
        "(job_type:conveyor_job_run_seconds:mean5m:zscore).",
    ),
    "ConveyorFailureRatioAnomalyHigh": (
        "{t} jobs fail unusually often",
        "{t}'s failure ratio is over 3 standard deviations above its usual for this hour "
        "(job_type:conveyor_job_failures:ratio_rate5m:zscore).",
    ),
    "ConveyorBatchSizeAnomalyLow": (
        "{t} batches are unusually small",
        "{t}'s mean batch size is over 3 standard deviations below its usual for this hour "
        "(job_type:conveyor_batch_size:mean5m:zscore).",
    ),
}


def load(minute: int) -> float:
    """0.2 at 04:00, 1.0 at 16:00."""
    return 0.6 - 0.4 * math.cos(2 * math.pi * ((minute % DAY) - 240) / DAY)


@dataclass
class Minute:
    """What one job type does in one minute."""

    jobs: float
    failure_ratio: float
    run_s: float  # mean run time of a job
    batch_size: float  # mean items per batch


@dataclass
class JobType:
    """A job type's cumulative counters, one sample a minute, as the exporter serves them."""

    name: str
    histograms: bool = True
    series: dict[str, list[float]] = field(default_factory=dict)

    def add(self, m: Minute) -> None:
        failures = m.jobs * m.failure_ratio
        deltas = {"SUCCESS": m.jobs - failures, "FAILURE": failures}
        if self.histograms:
            deltas |= {"run_sum": m.jobs * m.run_s, "run_count": m.jobs,
                       "batch_sum": m.jobs, "batch_count": m.jobs / m.batch_size}  # fmt: skip
        for key, delta in deltas.items():
            values = self.series.setdefault(key, [0.0])
            values.append(values[-1] + delta)

    def input_series(self) -> list[dict[str, str]]:
        names = {
            "SUCCESS": 'conveyor_jobs_total{{job_type="{}", state="SUCCESS", instance="e1"}}',
            "FAILURE": 'conveyor_jobs_total{{job_type="{}", state="FAILURE", instance="e1"}}',
            "run_sum": 'conveyor_job_run_seconds_sum{{job_type="{}", instance="e1"}}',
            "run_count": 'conveyor_job_run_seconds_count{{job_type="{}", instance="e1"}}',
            "batch_sum": 'conveyor_batch_size_sum{{job_type="{}", instance="e1"}}',
            "batch_count": 'conveyor_batch_size_count{{job_type="{}", instance="e1"}}',
        }
        out = []
        for key, values in self.series.items():
            if key == "FAILURE" and not any(values):
                continue  # a type that never failed has no FAILURE series at all
            out.append({"series": names[key].format(self.name), "values": " ".join(f"{v:.3f}" for v in values)})
        return out


Shape = Callable[[int, Minute], Minute]  # (minute, normal minute) -> what happens instead


def busy_day(rng: random.Random, minute: int, scale: float) -> Minute:
    """A busy inference type (classify): up to 600 jobs a minute, noise on everything."""
    level = load(minute)
    noise = lambda width: 1 + rng.uniform(-width, width)  # noqa: E731
    return Minute(
        jobs=600 * level * scale * noise(0.1),
        failure_ratio=0.01 * noise(0.3),
        run_s=0.2 * (1 + 0.5 * level) * noise(0.05),
        batch_size=2 + 14 * level * noise(0.05),
    )


def promtool_case(series: list[dict[str, str]], checks: list[tuple[int, str, list[str]]]) -> dict[str, object]:
    """One promtool test: checks are (minute, alert, job types it fires for)."""
    tests = []
    for minute, alert, firing in checks:
        summary, description = DESCRIPTIONS[alert]
        tests.append({
            "eval_time": f"{minute}m",
            "alertname": alert,
            "exp_alerts": [
                {"exp_labels": {"severity": ALERTS[alert], "job_type": t},
                 "exp_annotations": {"summary": summary.format(t=t), "description": description.format(t=t)}}
                for t in firing
            ],
        })  # fmt: skip
    return {"interval": "1m", "input_series": series, "alert_rule_test": tests}


def run_promtool(tmp_path: Path, cases: list[dict[str, object]]) -> str:
    promtool = _tool("promtool")
    (tmp_path / ANOMALY_RULES.name).write_text(ANOMALY_RULES.read_text())
    test_file = tmp_path / "anomalies.test.yml"
    test_file.write_text(json.dumps({"rule_files": [ANOMALY_RULES.name], "evaluation_interval": "1m", "tests": cases}))
    out = subprocess.run(
        [promtool, "test", "rules", test_file.name], cwd=tmp_path, capture_output=True, text=True, timeout=600,
        check=False,
    )  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    return out.stdout


def two_days(shapes: dict[str, tuple[int, int, Shape]], seed: int = 1) -> list[dict[str, str]]:
    """Yesterday (the baseline), then today 10 % busier; `shapes` bends today's classify traffic
    in [start, end) minutes of the day."""
    rng = random.Random(seed)
    classify, train, recommend = JobType("classify"), JobType("train", histograms=False), JobType("recommend")
    for minute in range(2 * DAY):
        today = minute >= DAY
        normal = busy_day(rng, minute, 1.1 if today else 1.0)
        for start, end, shape in shapes.values():
            if today and start <= minute - DAY < end:
                normal = shape(minute, normal)
        classify.add(normal)
        # train: 0.6 jobs a minute (0.01/s), every one failing for an hour today: too little to page.
        all_fail = today and 5 * 60 <= minute - DAY < 6 * 60
        train.add(Minute(jobs=0.6, failure_ratio=1.0 if all_fail else 0.05, run_s=60, batch_size=1))
        # recommend: exactly 60 jobs a minute, never failing, every day the same: its baseline's
        # stddev is 0. Today it is 2 % less busy, 2 % slower and its batches 2 % smaller.
        bump = 0.02 if today else 0.0
        recommend.add(
            Minute(jobs=60 * (1 - bump), failure_ratio=0.0, run_s=0.05 * (1 + bump), batch_size=8 * (1 - bump))
        )
    return classify.input_series() + train.input_series() + recommend.input_series()


def every(step: int, first: int = DAY, last: int = 2 * DAY) -> range:
    return range(first, last, step)


def test_a_normal_day_with_noise_raises_no_alert(tmp_path: Path) -> None:
    checks: list[tuple[int, str, list[str]]] = [(m, alert, []) for m in every(10) for alert in ALERTS]
    # Yesterday too: no baseline yet, so nothing can fire.
    checks += [(m, alert, []) for m in every(60, 0, DAY) for alert in ALERTS]
    run_promtool(tmp_path, [promtool_case(two_days({}), checks)])


ANOMALIES: dict[str, tuple[int, int, Shape]] = {
    # alert: (start, end) minute of the day, and what happens then
    "ConveyorFailureRatioAnomalyHigh": (2 * 60, 3 * 60, lambda _, m: Minute(m.jobs, 0.25, m.run_s, m.batch_size)),
    "ConveyorBatchSizeAnomalyLow": (8 * 60, 9 * 60, lambda _, m: Minute(m.jobs, m.failure_ratio, m.run_s, 1.0)),
    "ConveyorThroughputAnomalyLow": (
        13 * 60,
        14 * 60,
        lambda _, m: Minute(0.3 * m.jobs, m.failure_ratio, m.run_s, m.batch_size),
    ),  # fmt: skip
    "ConveyorLatencyAnomalyHigh": (
        19 * 60,
        20 * 60,
        lambda _, m: Minute(m.jobs, m.failure_ratio, 3 * m.run_s, m.batch_size),
    ),  # fmt: skip
}


def test_each_injected_anomaly_fires_its_alert_and_only_there(tmp_path: Path) -> None:
    checks: list[tuple[int, str, list[str]]] = []
    for alert in ALERTS:
        start, end, _ = ANOMALIES[alert]
        for m in every(10):
            of_day = m - DAY
            if start + 20 <= of_day < end:  # 5 min of rate window, 10 min pending, a margin
                checks.append((m, alert, ["classify"]))
            elif not start <= of_day < end + 15:  # the 5 min rate window drains after the end
                checks.append((m, alert, []))
    run_promtool(tmp_path, [promtool_case(two_days(ANOMALIES), checks)])
    fired = {alert for _, alert, firing in checks if firing}
    assert fired == set(ALERTS), "every anomaly alert has a case where it fires"


def test_the_weekly_baseline_knows_weekends(tmp_path: Path) -> None:
    """Day 0 and day 7 are weekend days (40 % of the load); days 1-6 are weekdays. On day 7,
    yesterday (a weekday) would make the whole day look like a collapse; last week's same day
    does not, and a real drop (to 30 % from 12:00 to 13:00) still fires."""
    rng = random.Random(7)
    classify = JobType("classify")
    drop = (12 * 60, 13 * 60)
    for minute in range(8 * DAY):
        day = minute // DAY
        scale = 0.4 if day in (0, 7) else 1.0
        normal = busy_day(rng, minute, scale * (1.05 if day == 7 else 1.0))
        if day == 7 and drop[0] <= minute % DAY < drop[1]:
            normal = Minute(0.3 * normal.jobs, normal.failure_ratio, normal.run_s, normal.batch_size)
        classify.add(normal)
    checks: list[tuple[int, str, list[str]]] = []
    for m in every(30, 7 * DAY, 8 * DAY):
        of_day = m % DAY
        firing = ["classify"] if drop[0] + 20 <= of_day < drop[1] else []
        if firing or not drop[0] <= of_day < drop[1] + 15:
            checks.append((m, "ConveyorThroughputAnomalyLow", firing))
            checks += [(m, alert, []) for alert in ALERTS if alert != "ConveyorThroughputAnomalyLow"]
    run_promtool(tmp_path, [promtool_case(classify.input_series(), checks)])


def test_the_rules_load_in_promtool() -> None:
    promtool = _tool("promtool")
    checked = subprocess.run(
        [promtool, "check", "rules", str(ANOMALY_RULES)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    text = ANOMALY_RULES.read_text()
    assert set(ALERTS) == {line.split(":", 1)[1].strip() for line in text.splitlines() if "- alert:" in line}
