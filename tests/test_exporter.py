"""The exporter against real parts: jobs queued with the SDK while no worker consumes them, a real
training worker that comes up and goes down, `conveyor status`, and Flower's login on its
/metrics and /healthcheck."""

from __future__ import annotations

import base64
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from celery import Celery
from conftest import ROOT, WorkerProcess
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from test_metrics import Samples, db_url, exporter_settings, scrape, value

from producers.client import Client
from producers.exporter import (
    DEFAULT_QUEUES,
    MAX_EXCEPTION_LABELS,
    MAX_LABEL_CHARS,
    TASK_EVENTS,
    BoundedLabel,
    CeleryEvents,
    Exporter,
)
from producers.local_redis import free_port
from shared.errors import JobFailed
from shared.jobs import ClassifyJob, RecommendJob, TrainJob, TranscribeJob
from shared.names import ALL_QUEUES, BULK_QUEUES
from shared.supervisor import ChildSpec, spawn


def _fresh_db(redis_url: str, db: int) -> str:
    url = db_url(redis_url, db)
    with redis.Redis.from_url(url) as r:
        r.flushdb()
    return url


@pytest.fixture
def queued_db(redis_url: str) -> Iterator[str]:
    url = _fresh_db(redis_url, 12)
    yield url
    _fresh_db(redis_url, 12)


def _wait_for(what: str, check: Callable[[], bool], timeout: float, detail: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    pytest.fail(f"{what} not seen within {timeout:.0f}s\n{detail()}")


def test_queue_lengths_by_priority_and_oldest_age(queued_db: str, conveyor_env: dict[str, str], tmp_path: Path) -> None:
    now = datetime.now(UTC)
    ago = lambda s: now - timedelta(seconds=s)  # noqa: E731
    classify = lambda p, s: ClassifyJob(texts=["a"], labels=["x", "y"], priority=p, submitted_at=ago(s))  # noqa: E731
    jobs = [
        classify(9, 100), classify(9, 50), classify(9, 10), classify(5, 40), classify(5, 20),
        classify(0, 300),  # the oldest sits in the least urgent list
        # Same list: the first one pushed is the oldest (index -1, taken first).
        RecommendJob(users=["u1"], model="m", submitted_at=ago(60)),
        RecommendJob(users=["u2"], model="m", submitted_at=ago(5)),
        # 40 KB of inline audio: only the head of the message is read.
        TranscribeJob(audio_b64=base64.b64encode(os.urandom(30_000)), submitted_at=ago(30)),
    ]  # fmt: skip
    with Client(queued_db) as client:
        client.submit_many(jobs)
        client.redis.lpush("conveyor.training", b"\xffnot a kombu message")  # a foreign producer's garbage
    exporter = Exporter(exporter_settings(queued_db, tmp_path), port=0).start()
    try:
        s = scrape(exporter.url)
        lengths = {q: value(s, "celery_queue_length", queue_name=q) for q in
                   ("conveyor.classify", "conveyor.recommend", "conveyor.transcribe", "conveyor.training")}  # fmt: skip
        assert lengths == {
            "conveyor.classify": 6, "conveyor.recommend": 2, "conveyor.transcribe": 1, "conveyor.training": 1
        }  # fmt: skip
        for queue in BULK_QUEUES.values():
            assert value(s, "celery_queue_length", queue_name=queue) == 0
            assert value(s, "conveyor_queue_oldest_age_seconds", queue_name=queue) == 0
        by_priority = {
            p: value(s, "conveyor_queue_length_by_priority", queue_name="conveyor.classify", priority=str(p))
            for p in range(10)
        }
        assert by_priority == {9: 3, 8: 0, 7: 0, 6: 0, 5: 2, 4: 0, 3: 0, 2: 0, 1: 0, 0: 1}
        assert value(s, "conveyor_queue_length_by_priority", queue_name="conveyor.recommend", priority="5") == 2

        def age(queue: str) -> float:
            seconds = value(s, "conveyor_queue_oldest_age_seconds", queue_name=queue)
            assert seconds is not None, f"no age for {queue}"
            return seconds

        assert 300 <= age("conveyor.classify") < 330
        assert 60 <= age("conveyor.recommend") < 90
        assert 30 <= age("conveyor.transcribe") < 60
        # Garbage cannot be dated: its age counts from when this exporter first saw it.
        first = age("conveyor.training")
        assert 0 <= first < 5
        time.sleep(1.1)
        s = scrape(exporter.url)
        assert age("conveyor.training") >= first + 1
        assert value(s, "conveyor_dead_letter_queue_length") == 0
    finally:
        exporter.stop()

    # `conveyor status` prints the same numbers.
    out = subprocess.run(
        [sys.executable, "-m", "producers.cli", "status"], env=dict(conveyor_env, CONVEYOR_REDIS_URL=queued_db),
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    overview = json.loads(out.stdout)
    classify_q = overview["queues"]["conveyor.classify"]
    assert classify_q["length"] == 6 and classify_q["by_priority"] == {"9": 3, "5": 2, "0": 1}
    assert 300 <= classify_q["oldest_age_s"] < 330
    assert overview["queues"]["conveyor.recommend"]["length"] == 2
    assert overview["queues"]["conveyor.training"] == {"length": 1, "by_priority": {"9": 1}, "oldest_age_s": None}
    assert overview["dead_letter_queue"] == 0 and overview["workers"] == {}


@pytest.mark.slow
def test_worker_up_and_down_and_task_events(redis_url: str, conveyor_env: dict[str, str], tmp_path: Path) -> None:
    url = _fresh_db(redis_url, 13)
    exporter = Exporter(exporter_settings(url, tmp_path, metrics_worker_timeout_s=5.0), port=0).start()
    env = dict(conveyor_env, CONVEYOR_REDIS_URL=url)
    host = f"train-cpu@{socket.gethostname()}"
    worker = WorkerProcess(env, tmp_path / "worker.log", ["--only", "training"])
    samples: Samples = {}

    def up() -> float | None:
        samples.update(scrape(exporter.url))
        return value(samples, "celery_worker_up", hostname=host)

    try:
        _wait_for(f"celery_worker_up {host} 1", lambda: up() == 1, 120, worker.tail)
        bad = tmp_path / "interactions.csv"
        bad.write_text("colour,shape\nred,round\n")  # no user and item columns: fails at the worker
        with Client(url) as client:
            handle = client.submit(TrainJob(interactions_path=str(bad), output_name="never"))
            with pytest.raises(JobFailed):
                handle.result(timeout=60)

        def failed() -> bool:
            s = scrape(exporter.url)
            train = {("name", "conveyor.train"), ("hostname", host), ("queue_name", "conveyor.training")}
            failures = {dict(labels)["exception"]: v for (name, labels), v in s.items()
                        if name == "celery_task_failed_total" and train <= labels and v}  # fmt: skip
            return len(failures) == 1 and list(failures.values()) == [1] and "" not in failures

        _wait_for("celery_task_failed_total 1", failed, 10)
        s = scrape(exporter.url)
        sent = [v for (name, labels), v in s.items() if name == "celery_task_sent_total"
                and ("name", "conveyor.train") in labels]  # fmt: skip
        assert sent == [1.0]  # from the producer, under its own hostname

        # A warm shutdown says goodbye (worker-offline): down at once, and listed as down.
        worker.stop()
        _wait_for(f"celery_worker_up {host} 0", lambda: up() == 0, 15)
    finally:
        worker.stop()
        exporter.stop()


@pytest.mark.slow
def test_a_killed_worker_is_down_after_the_heartbeat_timeout(
    redis_url: str, conveyor_env: dict[str, str], tmp_path: Path
) -> None:
    url = _fresh_db(redis_url, 14)
    exporter = Exporter(exporter_settings(url, tmp_path, metrics_worker_timeout_s=4.0), port=0).start()
    host = f"train-cpu@{socket.gethostname()}"
    worker = WorkerProcess(dict(conveyor_env, CONVEYOR_REDIS_URL=url), tmp_path / "worker.log", ["--only", "training"])
    try:
        status = lambda: value(scrape(exporter.url), "celery_worker_up", hostname=host)  # noqa: E731
        _wait_for(f"celery_worker_up {host} 1", lambda: status() == 1, 120, worker.tail)
        time.sleep(3)
        assert status() == 1  # heartbeats keep it up
        worker.kill()  # no goodbye: only the missing heartbeats tell
        killed = time.monotonic()
        _wait_for(f"celery_worker_up {host} 0", lambda: status() == 0, 15)
        assert time.monotonic() - killed >= 1.5  # the last heartbeat (every 2 s) was at most 2 s old
    finally:
        worker.stop()
        exporter.stop()


def _get(url: str, login: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if login:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(login).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


def test_flower_metrics_and_healthcheck_need_the_login(
    redis_url: str, conveyor_env: dict[str, str], tmp_path: Path
) -> None:
    pytest.importorskip("flower")
    port = free_port()
    login = ("conveyor", "flower-test-pw")
    env = dict(conveyor_env, CONVEYOR_REDIS_URL=db_url(redis_url, 15), FLOWER_BASIC_AUTH=":".join(login))
    argv = [sys.executable, "-m", "producers.flower_secure", "-A", "producers.flower_app", "flower",
            "--address=127.0.0.1", f"--port={port}", "--persistent=False", "--logging=warning"]  # fmt: skip
    log = tmp_path / "flower.log"
    flower = spawn(ChildSpec("flower", argv, env=env, cwd=ROOT, log=log))
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for("Flower", lambda: _get(f"{base}/healthcheck", login) == 200, 90, lambda: log.read_text()[-3000:])
        for path in ("/metrics", "/healthcheck", "/api/workers", "/"):
            assert _get(base + path) == 401, path
            assert _get(base + path, ("conveyor", "wrong")) == 401, path
        assert _get(f"{base}/metrics", login) == 200
    finally:
        flower.stop(10)


def test_task_events_sent_in_bulk_are_counted(redis_url: str, tmp_path: Path) -> None:
    """A worker may send its task events many to a message (a list body, as Celery's buffered
    dispatcher does); a failure event that carries only the uuid gets its task's name and queue.
    celery-exporter's labels: queue_name on every task counter (from task-sent, else the queue the
    registry routes the task to), exception (the class name) on failures, tasks active from the
    heartbeat, and producers' gen<pid>@host node names folded to the host."""
    url = _fresh_db(redis_url, 15)
    exporter = Exporter(exporter_settings(url, tmp_path), port=0).start()
    bulk = "conveyor.bulk.classify"
    try:
        assert exporter.events.connected.wait(20), "the event receiver did not connect"
        time.sleep(0.5)  # its fanout subscription is live once the consumer loop runs
        with exporter.app.connection_for_write() as conn:
            for pid in (101, 102, 103):  # three CLI calls on one host
                producer = exporter.app.events.Dispatcher(conn, hostname=f"gen{pid}@desk")
                producer.send("task-sent", uuid=f"sent-{pid}", name="conveyor.classify", queue="conveyor.classify")
                producer.close()
            producer = exporter.app.events.Dispatcher(conn, hostname="gen104@desk")
            producer.send("task-sent", uuid="job-2", name="conveyor.classify", queue=bulk)
            producer.close()
            dispatcher = exporter.app.events.Dispatcher(
                conn, hostname="cpu@bulk", buffer_group=["task"], buffer_limit=100
            )
            for i in range(3):
                dispatcher.send("task-received", uuid=f"job-{i}", name="conveyor.classify")
            dispatcher.send("task-succeeded", uuid="job-0", runtime=0.25)
            dispatcher.send("task-failed", uuid="job-1", exception="InvalidJob('x')")
            dispatcher.send("task-failed", uuid="job-2", exception="shared.errors.ModelNotFound('no such model')")
            dispatcher.send("task-failed", uuid="job-9", exception="<not an exception repr>")
            dispatcher.flush()  # one message, a list of the task events
            dispatcher.send("worker-heartbeat", freq=2.0, active=3, processed=1)
            dispatcher.close()

        classify = {"name": "conveyor.classify", "hostname": "cpu@bulk", "queue_name": "conveyor.classify"}
        in_bulk = dict(classify, queue_name=bulk)

        def counted() -> bool:
            s = scrape(exporter.url)
            return (
                value(s, "celery_task_received_total", **classify) == 2
                and value(s, "celery_task_received_total", **in_bulk) == 1
                and value(s, "celery_task_failed_total", **classify, exception="InvalidJob") == 1
                and value(s, "celery_task_runtime_count", **classify) == 1
                and value(s, "celery_worker_tasks_active", hostname="cpu@bulk") == 3
            )

        _wait_for("the bulk events", counted, 15, lambda: json.dumps({str(k): v for k, v in scrape(exporter.url).items()
                                                                       if k[0].startswith("celery_")}))  # fmt: skip
        s = scrape(exporter.url)
        assert value(s, "celery_task_succeeded_total", **classify) == 1
        assert value(s, "celery_task_runtime_sum", **classify) == 0.25
        assert value(s, "celery_task_failed_total", **in_bulk, exception="ModelNotFound") == 1
        unknown = {"name": "unknown", "hostname": "cpu@bulk", "queue_name": "unknown"}
        assert value(s, "celery_task_failed_total", **unknown, exception="UnknownException") == 1
        # A worker's counters exist from its first event, at 0 where nothing happened yet.
        assert value(s, "celery_task_retried_total", **in_bulk) == 0
        assert value(s, "celery_task_failed_total", **classify, exception="") == 0
        sent = {labels: v for (name, labels), v in s.items() if name == "celery_task_sent_total"}
        assert sent == {
            frozenset({"name": "conveyor.classify", "hostname": "desk", "queue_name": "conveyor.classify"}.items()): 3,
            frozenset({"name": "conveyor.classify", "hostname": "desk", "queue_name": bulk}.items()): 1,
        }
        assert value(s, "celery_worker_up", hostname="cpu@bulk") == 1
    finally:
        exporter.stop()


def test_generic_sent_hostname_and_bounded_exception_labels(redis_url: str, tmp_path: Path) -> None:
    """CONVEYOR_METRICS_GENERIC_SENT_HOSTNAME: every producer's task-sent under one hostname; and
    no more than MAX_EXCEPTION_LABELS exception names, however many types the workers raise."""
    url = _fresh_db(redis_url, 15)
    exporter = Exporter(exporter_settings(url, tmp_path, metrics_generic_sent_hostname=True), port=0)
    events = exporter.events
    for host in ("gen1@a", "gen2@b", "gateway@c"):
        events.on_event({"type": "task-sent", "uuid": host, "name": "conveyor.ner", "hostname": host})
    for i in range(MAX_EXCEPTION_LABELS + 20):
        events.on_event({"type": "task-failed", "uuid": f"u{i}", "name": "conveyor.ner", "hostname": "cpu@w",
                         "exception": f"Error{i}('message {i}')"})  # fmt: skip
    exporter.server.server_close()
    exporter.redis.close()
    families = {m.name: m for m in exporter.registry.collect()}
    sent = [(s.labels, s.value) for s in families["celery_task_sent"].samples if s.name.endswith("_total")]
    assert sent == [({"name": "conveyor.ner", "hostname": "generic", "queue_name": "conveyor.ner"}, 3.0)]
    failed = families["celery_task_failed"].samples
    names = {s.labels["exception"] for s in failed if s.name.endswith("_total") and s.value}
    assert len(names) == MAX_EXCEPTION_LABELS + 1 and "other" in names and "Error0" in names
    other = [s.value for s in failed if s.name.endswith("_total") and s.labels["exception"] == "other"]
    assert other == [20.0]


def _series_of(registry: CollectorRegistry, hostname: str) -> list[str]:
    return [s.name for family in registry.collect() for s in family.samples if s.labels.get("hostname") == hostname]


def test_a_forgotten_worker_frees_its_series_and_producers_take_one_hostname() -> None:
    """A worker gone for CONVEYOR_METRICS_FORGET_WORKER_S loses its task series and its place
    among the bounded hostnames (a fleet of renamed pods does not end in "other"), and a
    hundred CLI calls' gen<pid>@desk node names take one place, "desk"."""
    registry = CollectorRegistry()
    receiver = CeleryEvents(Celery("forget", set_as_current=False), registry, worker_timeout_s=0.05,
                            forget_worker_s=0.05)  # fmt: skip
    registry.register(receiver)
    receiver.hostnames = BoundedLabel(2)
    for pid in range(100):
        receiver.on_event(
            {"type": "task-sent", "uuid": f"s{pid}", "name": "conveyor.ner", "hostname": f"gen{pid}@desk"}
        )
    receiver.on_event({"type": "worker-heartbeat", "hostname": "cpu@old", "active": 1})
    receiver.on_event({"type": "task-received", "uuid": "a", "name": "conveyor.ner", "hostname": "cpu@old"})
    receiver.on_event({"type": "task-failed", "uuid": "a", "hostname": "cpu@old", "exception": "InvalidJob('x')"})
    assert "celery_task_failed_total" in _series_of(registry, "cpu@old")
    assert "celery_worker_up" in _series_of(registry, "cpu@old")
    assert _series_of(registry, "desk") == ["celery_task_sent_total", "celery_task_sent_created"]
    time.sleep(0.2)
    list(registry.collect())  # a scrape: cpu@old is past its timeout and its forget time
    assert _series_of(registry, "cpu@old") == []
    receiver.on_event({"type": "task-received", "uuid": "b", "name": "conveyor.ner", "hostname": "cpu@new"})
    assert "celery_task_received_total" in _series_of(registry, "cpu@new")
    assert _series_of(registry, "other") == []


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=300),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
_event_types = st.sampled_from([*TASK_EVENTS, "worker-heartbeat", "worker-online", "worker-offline"]) | st.text(
    max_size=20
)
_hostile_event = st.fixed_dictionaries(
    {"type": _event_types | _json},
    optional={key: _json | st.text(max_size=300) for key in
              ("uuid", "name", "queue", "hostname", "exception", "runtime", "active")},
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(events=st.lists(_hostile_event, max_size=40))
def test_hostile_events_never_raise_and_the_series_stay_bounded(events: list[dict[str, object]]) -> None:
    """Any Celery client can send events to the broker: whatever their types and sizes, the
    receiver's handler never raises (which would drop its connection) and every label stays
    within its bound: Conveyor's own names and queues, then at most a few others, cut short."""
    registry = CollectorRegistry()
    receiver = CeleryEvents(Celery("hostile", set_as_current=False), registry)
    receiver.names, receiver.queues = BoundedLabel(2, DEFAULT_QUEUES), BoundedLabel(2, ALL_QUEUES)
    receiver.hostnames, receiver.exceptions = BoundedLabel(3), BoundedLabel(2)
    for event in events:
        receiver.on_event(event)
    values: dict[str, set[str]] = {}
    for family in registry.collect():
        for sample in family.samples:
            assert math.isfinite(sample.value), sample
            for label, text in sample.labels.items():
                assert len(text) <= MAX_LABEL_CHARS
                values.setdefault(label, set()).add(text)
    bounds = {"name": set(DEFAULT_QUEUES), "queue_name": set(ALL_QUEUES), "hostname": {"generic"}, "exception": {""}}
    limits = {"name": 2, "queue_name": 2, "hostname": 3, "exception": 2}
    for label, seen in values.items():
        if label in bounds:
            assert len(seen - bounds[label] - {"other"}) <= limits[label], (label, seen)


def test_the_monitoring_modules_import_neither_torch_nor_the_workers() -> None:
    check = (
        "import sys, producers.exporter, producers.overview, producers.queue_stats, producers.job_stats, "
        "producers.flower_secure, shared.metrics_keys\n"
        "print(','.join(m for m in ('torch', 'transformers', 'workers') if m in sys.modules) or 'light')"
    )
    out = subprocess.run(
        [sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "light"
