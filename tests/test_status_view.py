"""`conveyor status` with a real Redis and a real worker: the Rich view in a real terminal (a pty),
the JSON for scripts, --watch, a worker that stopped beating shown as down, and the latency
quantiles against the histogram they come from."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli_errors import in_pty

from producers.job_stats import Histogram
from shared.errors import JobFailed
from shared.metrics_keys import LATENCY_BUCKETS, bound_label
from shared.worker_presence import PRESENCE_KEY, WorkerPresence

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["sports", "finance"]


@pytest.fixture(scope="module")
def finished(worker: Any, client: Any, conveyor_env: dict[str, str]) -> dict[str, Any]:
    """Jobs that ran on the real worker (some failed), and that worker's entry in Redis."""
    from shared.jobs import ClassifyJob

    handles = client.submit_many([ClassifyJob(texts=["The striker scored twice."], labels=LABELS) for _ in range(6)])
    failing = client.submit(ClassifyJob(texts=["A text."], model="no-such-model"))
    for h in handles:
        h.result(timeout=120)
    with pytest.raises(JobFailed):
        failing.result(timeout=60)
    r = client.redis
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # entries every 2 s, metrics flushed every second
        entries = [WorkerPresence.model_validate_json(v) for v in r.hgetall(PRESENCE_KEY).values()]
        mine = [e for e in entries if e.hostname.startswith("cpu@") and e.succeeded >= 6 and e.batches >= 1]
        if mine:
            time.sleep(1.5)
            return {"worker": mine[0], "env": conveyor_env}
        time.sleep(0.5)
    pytest.fail(f"no presence entry with the finished jobs: {r.hgetall(PRESENCE_KEY)}")


@pytest.mark.slow  # the real worker and its model
def test_the_view_in_a_terminal(finished: dict[str, Any]) -> None:
    env = dict(finished["env"], COLUMNS="180", LINES="60", TERM="xterm")
    code, out, took = in_pty(["status"], env)
    assert code == 0, out
    name = finished["worker"].hostname
    for needle in ("Workers: ", name, "up", "inference", "cpu", "Queues:", "Dead letters:", "Jobs by kind", "classify",
                   "run p95", "ago"):  # fmt: skip
        assert needle in out, (needle, out)
    assert "Traceback" not in out and not out.lstrip().startswith("{")
    # Redis and the heartbeats only: no broadcast (the old status took ~4 s in three of them).
    assert took < 3.5, took


@pytest.mark.slow  # the real worker and its model
def test_json_for_scripts(finished: dict[str, Any]) -> None:
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "producers.cli", "status"], env=finished["env"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    took = time.monotonic() - started
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)  # not a terminal: JSON, as before
    assert {"workers", "queues", "dead_letter_queue", "dead_lettered", "jobs"} <= data.keys()
    me = data["workers"][finished["worker"].hostname]
    assert me["up"] is True and me["device"] == "cpu" and me["role"] == "inference" and me["succeeded"] >= 6
    assert "conveyor.classify" in me["queues"] and me["last_heartbeat_s"] < 15
    classify = data["jobs"]["classify"]
    assert classify["SUCCESS"] >= 6 and classify["FAILURE"] >= 1 and classify["batches"] >= 1
    assert 0 < classify["run_p50_s"] <= classify["run_p95_s"] and classify["mean_batch_size"] >= 1
    assert data["queues"]["conveyor.classify"]["length"] == 0
    forced = subprocess.run([sys.executable, "-m", "producers.cli", "status", "--json"], env=finished["env"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert json.loads(forced.stdout).keys() == data.keys()
    assert took < 5.0, took


@pytest.mark.slow  # the real worker and its model
def test_watch_refreshes_until_ctrl_c(finished: dict[str, Any]) -> None:
    import pty

    master, slave = pty.openpty()
    env = dict(finished["env"], COLUMNS="180", LINES="60", TERM="xterm")
    proc = subprocess.Popen([sys.executable, "-m", "producers.cli", "status", "--watch", "--interval", "0.5"],
                            stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT)  # fmt: skip
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and seen.count(b"Jobs by kind") < 3:
        try:
            seen += os.read(master, 65536)
        except OSError:
            break
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 0
    os.close(master)
    text = seen.decode(errors="replace")
    assert text.count("Jobs by kind") >= 3, text[-2000:]  # refreshed
    assert "jobs/s" in text and "Traceback" not in text


@pytest.mark.slow  # the real worker and its model
def test_a_worker_that_stopped_beating_is_down(finished: dict[str, Any], client: Any) -> None:
    r: redis.Redis = client.redis
    gone = finished["worker"].model_copy(update={"hostname": "cpu-2@gone-host", "beat_at": time.time() - 60})
    r.hset(PRESENCE_KEY, gone.hostname, gone.model_dump_json())
    r.hset(PRESENCE_KEY, "junk@host", b"not json")  # another version's entry never hides the rest
    try:
        out = subprocess.run([sys.executable, "-m", "producers.cli", "status"], env=finished["env"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        workers = json.loads(out.stdout)["workers"]
        assert workers["cpu-2@gone-host"]["up"] is False and workers["cpu-2@gone-host"]["last_heartbeat_s"] >= 59
        assert workers[finished["worker"].hostname]["up"] is True and "junk@host" not in workers
        code, view, _ = in_pty(["status"], dict(finished["env"], COLUMNS="180", TERM="xterm"))
        assert code == 0 and "down" in view and "cpu-2@gone-host" in view, view
    finally:
        r.hdel(PRESENCE_KEY, gone.hostname, "junk@host")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=5000.0), min_size=1, max_size=200), st.sampled_from([0.5, 0.95]))
def test_quantiles_fall_in_the_bucket_of_the_exact_quantile(values: list[float], q: float) -> None:
    """The histogram estimate is never outside the bucket that holds the exact quantile."""
    from bisect import bisect_left

    hist = Histogram(LATENCY_BUCKETS)
    for v in values:
        i = bisect_left(LATENCY_BUCKETS, v)
        label = bound_label(LATENCY_BUCKETS[i]) if i < len(LATENCY_BUCKETS) else "+Inf"
        hist.per_bucket[label] = hist.per_bucket.get(label, 0.0) + 1
    estimate = hist.quantile(q)
    assert estimate is not None
    exact = sorted(values)[max(0, math.ceil(q * len(values)) - 1)]
    i = bisect_left(LATENCY_BUCKETS, exact)
    low = LATENCY_BUCKETS[i - 1] if i > 0 else 0.0
    high = LATENCY_BUCKETS[i] if i < len(LATENCY_BUCKETS) else LATENCY_BUCKETS[-1]
    assert low - 1e-9 <= estimate <= high + 1e-9, (exact, estimate, low, high)
    assert Histogram(LATENCY_BUCKETS).quantile(q) is None
