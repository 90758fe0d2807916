"""The worker's long-lived pieces survive what one job brings: the result writer against results
it cannot encode and ids that are not text (real Redis), task events bounded like Celery's
argsrepr, and the memory bound that drains a worker before it is recycled."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from producers.local_redis import LocalRedis
from workers.envelope import Envelope
from workers.result_writer import MAX_ARGS_CHARS, Outcome, ResultWriter
from workers.task_events import REPR_CHARS, TaskEvents


@pytest.fixture
def url(tmp_path: Path) -> Iterator[str]:
    server = LocalRedis(tmp_path, record_url=False)
    yield server.start()
    server.stop()


def writer_for(url: str, written: list[Outcome]) -> ResultWriter:
    events = TaskEvents(Celery("t", broker=url), "test@host", "none")
    return ResultWriter(redis.Redis.from_url(url), "test@host", 600, events, written.extend).start()


def wait_written(written: list[Outcome], n: int) -> None:
    end = time.monotonic() + 10
    while len(written) < n and time.monotonic() < end:
        time.sleep(0.01)
    assert len(written) >= n


def test_an_unencodable_result_fails_its_job_alone_and_the_writer_goes_on(url: str) -> None:
    r = redis.Redis.from_url(url)
    r.hset("unacked", mapping={"t1": "x", "t2": "x", "t3": "x"})
    written: list[Outcome] = []
    writer = writer_for(url, written)
    try:
        bad = Outcome(Envelope("{}", tag="t1", id="bad"), "SUCCESS", {"labels": {1, 2}}, key=1)  # a set: not JSON
        odd_env = Envelope("{}", tag="t2", id="odd-\udcff", args=[{"t": "\ud800"}])
        odd = Outcome(odd_env, "FAILURE", ValueError("\ud800"))
        good = Outcome(Envelope("{}", tag="t3", id="good"), "SUCCESS", {"ok": True}, key=3)
        for o in (bad, odd, good):
            writer.put(o)
        wait_written(written, 3)
        assert json.loads(r.get("celery-task-meta-good") or b"")["status"] == "SUCCESS"
        failed = json.loads(r.get("celery-task-meta-bad") or b"")
        assert failed["status"] == "FAILURE" and "could not be written" in failed["result"]["exc_message"][0]
        # The id's raw byte is the key; its lone surrogates are written as JSON escapes.
        odd_meta = json.loads(r.get(b"celery-task-meta-odd-\xff") or b"")
        assert odd_meta["status"] == "FAILURE" and odd_meta["args"] == [{"t": "\ud800"}]
        assert r.hlen("unacked") == 0  # all three acknowledged
        writer.put(Outcome(Envelope("{}", id="after"), "SUCCESS", {"ok": 1}))
        wait_written(written, 4)
        assert r.exists("celery-task-meta-after")
    finally:
        writer.stop()


def test_large_args_are_kept_as_a_bounded_repr_in_the_result(url: str) -> None:
    r = redis.Redis.from_url(url)
    written: list[Outcome] = []
    writer = writer_for(url, written)
    try:
        args = [{"texts": ["word " * 4000] * 100}]
        writer.put(Outcome(Envelope("{}", id="big", args=args), "SUCCESS", {"ok": True}))
        wait_written(written, 1)
        raw = r.get("celery-task-meta-big") or b""
        meta = json.loads(raw)
        assert isinstance(meta["args"], str) and len(meta["args"]) <= 1100 and len(raw) < MAX_ARGS_CHARS
    finally:
        writer.stop()


def test_task_events_are_bounded_like_celerys_argsrepr() -> None:
    events = TaskEvents(Celery("t", broker="memory://"), "test@host", "all")
    huge = [{"texts": ["x" * 20_000] * 512}]
    started = time.perf_counter()
    events.received("id-1", "conveyor.classify", huge, {"k": "\ud800" * 5000}, 0, time.time())
    events.succeeded("id-1", {"results": ["y" * 50_000]}, 0.1)
    events.failed("id-2", ValueError("z" * 50_000), "conveyor.classify")
    elapsed = time.perf_counter() - started
    fields = [f for _, f in events._pending]
    for field in fields:
        for key in ("args", "kwargs", "result", "exception"):
            if key in field:
                assert len(field[key]) <= REPR_CHARS + 3, key
                field[key].encode("utf-8")  # text, whatever the job held
    assert elapsed < 0.1  # describing a 10 MB job costs what a small one does


def test_a_worker_over_its_memory_bound_drains_then_stops_warm(
    monkeypatch: pytest.MonkeyPatch, conveyor_env: dict[str, str]
) -> None:
    import workers.app as app

    class Held:
        held = 2
        drained = False

        def drain(self) -> None:
            self.drained = True

    ingest: Any = Held()
    kills: list[int] = []
    monkeypatch.setattr(app.process, "ingest", ingest)
    monkeypatch.setattr(app.settings, "max_memory_mb", 100)
    monkeypatch.setattr(app.settings, "drain_timeout_s", 30.0)
    monkeypatch.setattr(app, "resident_mb", lambda: 50.0)
    monkeypatch.setattr(app.os, "kill", lambda pid, sig: kills.append(sig))
    assert app._maybe_recycle(None) is None and not ingest.drained  # under the bound: nothing
    monkeypatch.setattr(app, "resident_mb", lambda: 500.0)
    since = app._maybe_recycle(None)
    assert since is not None and ingest.drained and kills == []  # draining, still holding two jobs
    assert app._maybe_recycle(since) == since and kills == []
    ingest.held = 0
    app._maybe_recycle(since)
    assert kills == [app.signal.SIGTERM]  # held jobs written: a warm stop, and the supervisor starts a fresh one
    kills.clear()
    ingest.held = 5
    app._maybe_recycle(since - 31.0)  # past the drain time: stop all the same (the rest goes back to its queues)
    assert kills == [app.signal.SIGTERM]
    assert app.resident_mb() > 1.0  # the real reading works here
