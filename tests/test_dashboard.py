"""scripts/grafana/conveyor.json against a real Prometheus scraping the real exporter.

After a known workload (classify, ner and keywords jobs through the session's real inference
worker, some failing with ModelNotFound and InvalidJob, in two rounds so that counters born in
the first round have an increase in the second), every query of the dashboard, its panels'
and its variables', is run through Prometheus' HTTP API with Grafana's variables filled in as
Grafana would ("All" is ``.*``), and must return at least one number. Every metric and label a
query names must be one the exporter serves (or a recording rule of
scripts/prometheus/conveyor-anomalies.yml), and celery-exporter's own boards find every metric
and label they use.

The anomaly panels' baselines and z-scores need a day of history (the same hour yesterday):
those queries must run without error here and their signals must have data; the rules' logic is
tested by tests/test_anomaly_rules.py."""

from __future__ import annotations

import json
import math
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, WorkerProcess
from test_exporter_prometheus import RULES, RULES_DIR, _query, _tool, _wait
from test_metrics import PASSWORD, Samples, exporter_settings, scrape

from producers.client import Client
from producers.exporter import Exporter
from producers.local_redis import free_port
from shared.errors import JobFailed
from shared.jobs import ClassifyJob
from shared.kinds.keywords import KeywordsJob
from shared.kinds.ner import NerJob
from shared.supervisor import Child, ChildSpec, spawn

pytestmark = pytest.mark.slow

DASHBOARD = ROOT / "scripts" / "grafana" / "conveyor.json"
ANOMALY_RULES = RULES_DIR / "conveyor-anomalies.yml"
# Grafana's variables as Grafana fills them in: "All" is allValue (.*), $__range the time picked.
GRAFANA_VARIABLES = {"$job_type": ".*", "$queue_name": ".*", "$__rate_interval": "2m", "$__range": "10m"}
NEEDS_HISTORY = re.compile(r":(baseline_mean|baseline_stddev|zscore)\b")
TARGET_LABELS = {"instance", "job"}  # added by Prometheus at scrape time
# Every metric and label celery-exporter's Grafana boards query (celery-mixin/dashboards_out/
# celery-tasks-overview.json, celery-tasks-by-task.json and celery-tasks.json in
# github.com/danihodovic/celery-exporter), less Kubernetes' cluster and namespace.
CELERY_EXPORTER_BOARDS = {
    **{
        f"celery_task_{event}_total": {"name", "queue_name"}
        for event in ("sent", "received", "succeeded", "retried", "rejected", "revoked")
    },  # fmt: skip
    "celery_task_failed_total": {"name", "queue_name", "exception"},
    "celery_task_runtime_bucket": {"name", "queue_name", "le"},
    "celery_task_runtime_sum": {"name", "queue_name"},
    "celery_task_runtime_count": {"name", "queue_name"},
    "celery_worker_up": {"hostname"},
    "celery_worker_tasks_active": {"hostname"},
    "celery_queue_length": {"queue_name"},
}


def dashboard_queries() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(panel title, PromQL) of every panel target, and (variable, label_values query)."""
    board = json.loads(DASHBOARD.read_text())
    panels = [
        (panel["title"], target["expr"])
        for panel in board["panels"]
        for target in panel.get("targets", [])
    ]  # fmt: skip
    variables = [(v["name"], v["query"]["query"]) for v in board["templating"]["list"] if v["type"] == "query"]
    return panels, variables


def grafana_fill(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a variable the test does not fill in: {expr}"
    return expr


def recorded_names() -> set[str]:
    return set(re.findall(r"^\s*- record: (\S+)$", ANOMALY_RULES.read_text(), re.M))


# -- what a query names ---------------------------------------------------------------------
def named_series(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, label names in its matcher) for every series a PromQL query selects: Conveyor's
    and Celery's metrics and the anomaly rules' recorded series."""
    return [
        (m.group(1), set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", m.group(2) or "")))
        for m in re.finditer(r"\b((?:conveyor_|celery_|job_type:)[a-zA-Z0-9_:]*)\s*(\{[^}]*\})?", expr)
    ]


def grouping_labels(expr: str) -> set[str]:
    return {label.strip() for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
            for label in group.split(",") if label.strip()}  # fmt: skip


def served_labels(samples: Samples) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for name, labels in samples:
        out.setdefault(name, set()).update(label for label, _ in labels)
    return out


def test_the_file_is_a_dashboard_grafana_imports() -> None:
    """Unique panel ids, every panel on the Prometheus data source picked at import, refIds per
    target, and a grid that fits Grafana's 24 columns."""
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "conveyor" and board["schemaVersion"] >= 36
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    (source,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert source["query"] == "prometheus"
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]


def test_every_query_names_metrics_and_labels_the_exporter_serves(exporter_after_workload: Samples) -> None:
    served = served_labels(exporter_after_workload)
    records = recorded_names()
    panels, variables = dashboard_queries()
    assert len(panels) >= 30 and {v for v, _ in variables} == {"job_type", "queue_name"}
    problems = []
    for title, expr in panels + [(f"variable {v}", q) for v, q in variables]:
        series = named_series(expr)
        if not series:
            problems.append(f"{title}: names no series: {expr}")
        labels_here: set[str] = set()
        for name, matched in series:
            if name.startswith("job_type:"):
                if name not in records:
                    problems.append(f"{title}: {name} is no recording rule of {ANOMALY_RULES.name}")
                known = {"job_type"}
            elif name not in served:
                problems.append(f"{title}: the exporter serves no {name}")
                continue
            else:
                known = served[name]
            labels_here |= known
            if missing := matched - known - TARGET_LABELS:
                problems.append(f"{title}: {name} has no label {sorted(missing)}")
        if missing := grouping_labels(expr) - labels_here - TARGET_LABELS:
            problems.append(f"{title}: groups by {sorted(missing)}, which no series of the query has")
        for metric, label in re.findall(r"label_values\((\w+),\s*(\w+)\)", expr):
            if label not in served.get(metric, set()):
                problems.append(f"{title}: {metric} has no label {label}")
    assert not problems, "\n".join(problems)

    # celery-exporter's own boards: every metric and label they query is served.
    missing_parity = {m: sorted(labels - served.get(m, set())) for m, labels in CELERY_EXPORTER_BOARDS.items()}
    assert not {m: labels for m, labels in missing_parity.items() if labels or m not in served}, missing_parity


def test_the_checker_catches_a_wrong_name_or_label(exporter_after_workload: Samples) -> None:
    """The name and label check above can fail: a misspelt metric, a label a metric does not
    have, and a grouping label no series carries are each found."""
    served = served_labels(exporter_after_workload)
    assert [n for n, _ in named_series('sum by (job_type) (rate(conveyor_jobs_totl{state="X"}[1m]))')] == [
        "conveyor_jobs_totl"
    ]
    assert "conveyor_jobs_totl" not in served
    ((_, matched),) = named_series('celery_queue_length{job_type=~".*"}')
    assert matched - served["celery_queue_length"] == {"job_type"}
    assert grouping_labels("max by (hostname, exception) (celery_worker_up)") - served["celery_worker_up"] == {
        "exception"
    }


def test_every_dashboard_query_returns_data_from_prometheus(prometheus_after_workload: str) -> None:
    base = prometheus_after_workload
    panels, variables = dashboard_queries()
    queries = [(title, grafana_fill(expr)) for title, expr in panels]
    # A variable's label_values(metric, label) is the label's values on that metric.
    queries += [(f"variable {v}", re.sub(r"label_values\((\w+),\s*(\w+)\)", r"group by (\2) (\1)", q))
                for v, q in variables]  # fmt: skip
    history = [(t, q) for t, q in queries if NEEDS_HISTORY.search(q)]
    live = [(t, q) for t, q in queries if not NEEDS_HISTORY.search(q)]
    assert len(history) <= 8, "only the anomaly panels' baselines and z-scores may need a day of history"

    def empty() -> list[str]:
        return [f"{title}: {q}" for title, q in live if not _numbers(_query(base, q))]

    deadline = time.monotonic() + 60
    while (missing := empty()) and time.monotonic() < deadline:
        time.sleep(1)
    assert not missing, "queries with no data:\n" + "\n".join(missing)

    for title, q in history:  # valid PromQL (the API says success), empty without yesterday
        assert _query(base, q) == [], f"{title} has data without a day of history: {q}"
        for signal in {re.sub(NEEDS_HISTORY, "", name) for name, _ in named_series(q)}:
            assert _numbers(_query(base, signal)), f"{title}: its signal {signal} has no data"

    # The known workload, seen through the dashboard's own queries.
    by_exception = dict(panels)["Failed tasks by exception (Celery events)"]
    failed = {r["metric"]["exception"] for r in _query(base, grafana_fill(by_exception))}  # type: ignore[index]
    assert {"ModelNotFound", "InvalidJob"} <= failed, failed
    ratio = _query(base, grafana_fill(dict(panels)["Failure ratio by kind"]))
    ratios = {r["metric"]["job_type"]: float(r["value"][1]) for r in ratio}  # type: ignore[index]
    assert 0 < ratios["classify"] < 1, ratios  # 1 job in 4 named a missing model


def test_every_rule_evaluates_without_error_on_real_series(prometheus_after_workload: str) -> None:
    """The alert and anomaly rules as Prometheus runs them on the exporter's real series: every
    rule loaded and its last evaluation healthy (no matching conflicts, no bad types)."""
    with urllib.request.urlopen(f"{prometheus_after_workload}/api/v1/rules", timeout=5) as response:
        groups = json.load(response)["data"]["groups"]
    rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert recorded_names() <= set(rules), recorded_names() - set(rules)
    deadline = time.monotonic() + 10
    while any(r.get("health") != "ok" for r in rules.values()) and time.monotonic() < deadline:
        time.sleep(1)  # a rule not evaluated yet is "unknown"
        with urllib.request.urlopen(f"{prometheus_after_workload}/api/v1/rules", timeout=5) as response:
            groups = json.load(response)["data"]["groups"]
        rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
    unhealthy = {name: (r.get("health"), r.get("lastError")) for name, r in rules.items() if r.get("health") != "ok"}
    assert not unhealthy, unhealthy


def _numbers(result: list[dict[str, Any]]) -> list[float]:
    return [v for r in result if not math.isnan(v := float(r["value"][1]))]


# -- the workload, the exporter and Prometheus ------------------------------------------------
@pytest.fixture(scope="module")
def live_exporter(
    worker: WorkerProcess, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Exporter]:
    exporter = Exporter(exporter_settings(redis_url, tmp_path_factory.mktemp("exporter")), port=0).start()
    assert exporter.events.connected.wait(20), "the exporter's event receiver did not connect"
    yield exporter
    exporter.stop()


@pytest.fixture(scope="module")
def prometheus(live_exporter: Exporter, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("prometheus")
    child, base = _start_prometheus(home, live_exporter.port)
    try:
        _wait("the scrape target up", lambda: _query(base, 'up{job="conveyor"} == 1'), 60, home / "prometheus.log")
        yield base
    finally:
        child.stop(10)


@pytest.fixture(scope="module")
def workload_done(prometheus: str, client: Client) -> None:
    """Two rounds, a few seconds apart, each: classify, ner and keywords jobs that succeed, a
    classify job naming a model that does not exist, and a ner job whose payload is invalid."""
    for _ in range(2):
        good = client.submit_many(
            [ClassifyJob(texts=["the match went to extra time"], labels=["sports", "finance"]) for _ in range(3)]
            + [NerJob(texts=["Grace Hopper flew to Tokyo."]) for _ in range(3)]
            + [KeywordsJob(texts=["Solar panels turn sunlight into electricity for homes."], k=2)]
        )
        missing_model = client.submit(ClassifyJob(texts=["x"], model="no-such-model"))
        invalid = client.app.send_task(
            "conveyor.ner", args=[{"texts": ["x"], "labels": ["CITY"]}], queue="conveyor.ner"
        )
        for handle in good:
            handle.result(timeout=120)
        for handle in (missing_model, client.job(invalid.id)):
            with pytest.raises(JobFailed):
                handle.result(timeout=120)
        time.sleep(3)  # flushed (1 s) and scraped (1 s) before the next round


@pytest.fixture(scope="module")
def exporter_after_workload(workload_done: None, live_exporter: Exporter) -> Samples:
    deadline = time.monotonic() + 30
    while True:
        try:
            samples = scrape(live_exporter.url)
        except urllib.error.URLError:
            samples = {}
        if any(name == "celery_task_failed_total" and v for (name, _), v in samples.items()):
            return samples
        if time.monotonic() > deadline:
            pytest.fail("no task-failed event reached the exporter")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def prometheus_after_workload(workload_done: None, prometheus: str) -> str:
    return prometheus


def _start_prometheus(home: Path, exporter_port: int) -> tuple[Child, str]:
    prometheus = _tool("prometheus")
    (home / "password").write_text(PASSWORD)
    shutil.copy(RULES, home / RULES.name)
    # The anomaly rules as shipped, evaluated every second instead of every minute, so the test
    # need not wait a minute for the signals the anomaly panels show.
    (home / ANOMALY_RULES.name).write_text(ANOMALY_RULES.read_text().replace("interval: 1m", "interval: 1s"))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [RULES.name, ANOMALY_RULES.name],
        "scrape_configs": [
            {
                "job_name": "conveyor",
                "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}],
                "basic_auth": {"username": "conveyor", "password_file": str(home / "password")},
            }
        ],
    }
    (home / "prometheus.yml").write_text(json.dumps(config))
    port = free_port()
    argv = [
        prometheus, f"--config.file={home / 'prometheus.yml'}", f"--storage.tsdb.path={home / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
    ]  # fmt: skip
    return spawn(ChildSpec("prometheus", argv, cwd=home, log=home / "prometheus.log")), f"http://127.0.0.1:{port}"
