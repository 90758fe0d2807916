"""The ingest's retry and time-limit policy, against a real Redis, with a fake runtime (the one
piece under test is the ingest): transient failures are retried with backoff up to a bound,
the count shows in the job's state, the exhausted ones are dead-lettered with their message;
invalid jobs are never retried; a job stuck past its time limit is let go for redelivery."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from producers.local_redis import LocalRedis
from shared.dead_letters import DeadLetter
from shared.errors import InvalidJob, TransientError
from shared.jobs import JobBase
from shared.names import DEAD_LETTER_KEY
from workers.ingest import Ingest
from workers.task_events import TaskEvents


class FlakyRuntime:
    """Fails each job transiently ``failures[text]`` times, then succeeds; 'invalid' fails for good;
    'hang' never finishes."""

    def __init__(self, failures: dict[str, int]) -> None:
        self.failures = dict(failures)
        self.calls: dict[str, int] = {}
        self.cancelled: list[str] = []

    def cancel(self, job: JobBase) -> None:
        self.cancelled.append(job.id)

    def submit(
        self, jobs: Sequence[JobBase], done: Callable[[JobBase, Any], None], urgency: Callable[[JobBase], float]
    ) -> None:
        for job in jobs:
            text = job.texts[0]  # type: ignore[attr-defined]
            self.calls[text] = self.calls.get(text, 0) + 1
            if text == "hang":
                continue
            if text == "invalid":
                done(job, InvalidJob("texts.0: not a real text"))
            elif self.failures.get(text, 0) > 0:
                self.failures[text] -= 1
                done(job, TransientError("CUDA out of memory (simulated)"))
            else:
                done(job, {"job_id": job.id, "type": "classify", "results": [], "meta": {}})


@pytest.fixture
def url(tmp_path: Path) -> Iterator[str]:
    server = LocalRedis(tmp_path, record_url=False)
    yield server.start()
    server.stop()


def make_ingest(url: str, runtime: FlakyRuntime, **overrides: Any) -> Ingest:
    options: dict[str, Any] = {
        "hostname": "test@host", "queues": ["conveyor.classify"], "bulk_queues": [], "prefetch_items": 8,
        "result_ttl_s": 600, "time_limit_s": 600, "max_retries": 3, "retry_backoff_s": 0.05,
    }  # fmt: skip
    options.update(overrides)
    events = TaskEvents(Celery("t", broker=url), "test@host", "none")
    return Ingest(redis.Redis.from_url(url), runtime, redis.Redis.from_url(url), events, **options)  # type: ignore[arg-type]


def send(app: Celery, text: str) -> str:
    return str(
        app.send_task("conveyor.classify", args=[{"texts": [text], "labels": ["a", "b"]}], queue="conveyor.classify").id
    )


def state(r: redis.Redis, task_id: str, timeout: float = 20) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        raw = r.get(f"celery-task-meta-{task_id}")
        if raw is not None:
            return dict(json.loads(raw))
        time.sleep(0.02)
    raise AssertionError(f"no result for {task_id}")


def test_transient_failures_are_retried_with_a_bound_and_then_dead_lettered(url: str) -> None:
    runtime = FlakyRuntime({"twice": 2, "always": 99})
    ingest = make_ingest(url, runtime).start()
    app = Celery("producer", broker=url, backend=url)
    r = redis.Redis.from_url(url)
    try:
        twice, always, invalid = send(app, "twice"), send(app, "always"), send(app, "invalid")
        ok = state(r, twice)
        assert ok["status"] == "SUCCESS" and ok["retries"] == 2 and runtime.calls["twice"] == 3
        failed = state(r, always)
        assert failed["status"] == "FAILURE" and failed["retries"] == 3 and runtime.calls["always"] == 4
        assert failed["result"]["exc_type"] == "TransientError"
        bad = state(r, invalid)
        assert (
            bad["status"] == "FAILURE" and bad["result"]["exc_type"] == "InvalidJob" and runtime.calls["invalid"] == 1
        )
        time.sleep(0.3)
        letters = [DeadLetter.from_json(v) for v in r.hvals(DEAD_LETTER_KEY)]
        assert [(x.id, x.retries) for x in letters] == [(always, 3)]
        assert "failed after 3 retries" in letters[0].reason
        assert json.loads(letters[0].message)["headers"]["id"] == always  # the original message, to requeue
        assert r.hlen("unacked") == 0
    finally:
        ingest.stop(timeout=5)


def test_a_job_stuck_past_its_time_limit_is_cancelled_requeued_and_dead_lettered_after_n_deliveries(url: str) -> None:
    runtime = FlakyRuntime({})
    ingest = make_ingest(url, runtime, time_limit_s=0.3, max_deliveries=3).start()
    app = Celery("producer", broker=url, backend=url)
    r = redis.Redis.from_url(url)
    try:
        job_id = send(app, "hang")
        end = time.monotonic() + 10
        while not ingest.held and time.monotonic() < end:
            time.sleep(0.02)
        assert len(ingest.held_tags()) == 1  # held and leased while young
        end = time.monotonic() + 20
        while r.get(f"celery-task-meta-{job_id}") is None and time.monotonic() < end:
            ingest.held_tags()  # what the lease keeper calls: gives up the jobs past their limit
            time.sleep(0.05)
        meta = state(r, job_id)
        assert meta["status"] == "FAILURE" and meta["result"]["exc_type"] == "InvalidJob"
        assert "delivered 4 times" in meta["result"]["exc_message"][0]
        assert runtime.calls["hang"] == 3  # three deliveries ran, the fourth was refused
        assert runtime.cancelled == [job_id] * 3  # each given-up copy was cancelled in its batcher
        assert ingest.timed_out == 3
        time.sleep(0.3)
        letters = [DeadLetter.from_json(v) for v in r.hvals(DEAD_LETTER_KEY)]
        assert [x.id for x in letters] == [job_id]
        assert r.hlen("unacked") == 0 and r.llen("conveyor.classify") == 0  # nothing left to loop
        count = r.get(f"conveyor:deliveries:{job_id}")
        assert count is None or int(count) == 4
    finally:
        ingest.stop(timeout=1)


def test_a_job_id_that_already_succeeded_is_acknowledged_not_run_again(url: str) -> None:
    runtime = FlakyRuntime({})
    ingest = make_ingest(url, runtime).start()
    app = Celery("producer", broker=url, backend=url)
    r = redis.Redis.from_url(url)
    try:
        first = send(app, "once")
        assert state(r, first)["status"] == "SUCCESS"
        job = {"texts": ["once"], "labels": ["a", "b"]}
        app.send_task("conveyor.classify", args=[job], queue="conveyor.classify", task_id=first)  # the same id again
        end = time.monotonic() + 10
        while (r.llen("conveyor.classify") or r.hlen("unacked")) and time.monotonic() < end:
            time.sleep(0.02)
        time.sleep(0.2)
        assert runtime.calls["once"] == 1 and r.hlen("unacked") == 0
        assert state(r, first)["status"] == "SUCCESS"
    finally:
        ingest.stop(timeout=5)


def test_the_pop_script_serves_priorities_then_bulk_and_files_every_message(url: str) -> None:
    from workers.ingest import pop_script, served_lists

    r = redis.Redis.from_url(url)
    lists = served_lists(["conveyor.classify", "conveyor.recommend"], ["conveyor.bulk.classify"])
    pop = r.register_script(pop_script(lists))
    keys = ["unacked", "unacked_index", DEAD_LETTER_KEY, "conveyor:dlq:order"]
    for pri in reversed(range(10)):  # every Celery priority list, least urgent pushed first
        for queue in ("conveyor.classify", "conveyor.recommend"):
            key = queue if pri == 0 else f"{queue}\x06\x16{pri}"
            r.lpush(key, json.dumps({"properties": {"delivery_tag": f"{queue}-{pri}", "priority": pri}}))
    r.lpush("conveyor.bulk.classify", json.dumps({"properties": {"delivery_tag": "bulk-1", "priority": 0}}))
    r.lpush("conveyor.bulk.classify", json.dumps({"properties": {"delivery_tag": "bulk-2", "priority": 0}}))
    out = pop(keys=keys, args=[6, 1.0, 20, 2])
    assert out[::4] == [b"conveyor.classify-0", b"conveyor.recommend-0", b"conveyor.classify-1",
                        b"conveyor.recommend-1", b"conveyor.classify-2", b"conveyor.recommend-2"]  # fmt: skip
    assert out[2::4] == [1, 2, 3, 4, 5, 6] and set(out[3::4]) == {b""}  # the list each came from; all filed
    out = pop(keys=keys, args=[0, 1.0, 20, 2])  # interactive room full: no bulk while interactive jobs wait
    assert out == []
    out = pop(keys=keys, args=[100, 1.0, 20, 2])
    assert len(out) // 4 == 14 and b"bulk-1" not in out  # the interactive rest first, bulk not with them
    out = pop(keys=keys, args=[100, 1.0, 20, 1])
    assert out[::4] == [b"bulk-1"]  # then bulk, one message at a time as the room allows
    assert r.hlen("unacked") == 21 and r.zcard("unacked_index") == 21


def test_a_message_that_sets_no_priority_waits_with_the_default_priority(url: str) -> None:
    """kombu files a stock client's message without a priority on the bare list, with the most
    urgent jobs; Conveyor serves it at its default priority (5) instead, behind more urgent ones."""
    from workers.ingest import pop_script, served_lists

    r = redis.Redis.from_url(url)
    pop = r.register_script(pop_script(served_lists(["conveyor.classify"], [])))
    keys = ["unacked", "unacked_index", DEAD_LETTER_KEY, "conveyor:dlq:order"]
    r.lpush("conveyor.classify", json.dumps({"properties": {"delivery_tag": "unset-1"}}))
    r.lpush("conveyor.classify", json.dumps({"properties": {"delivery_tag": "unset-2"}}))
    r.lpush("conveyor.classify", json.dumps({"properties": {"delivery_tag": "urgent", "priority": 0}}))
    r.lpush("conveyor.classify\x06\x162", json.dumps({"properties": {"delivery_tag": "seven", "priority": 2}}))
    r.lpush("conveyor.classify\x06\x164", json.dumps({"properties": {"delivery_tag": "five", "priority": 4}}))
    r.lpush("conveyor.classify\x06\x166", json.dumps({"properties": {"delivery_tag": "three", "priority": 6}}))
    out = pop(keys=keys, args=[10, 1.0, 10, 0])
    # Priority 9 (Celery 0) first, then 7, then the default 5 in arrival order with the unset ones after it, then 3.
    assert out[::4] == [b"urgent", b"seven", b"five", b"unset-1", b"unset-2", b"three"]
    assert r.llen("conveyor.classify") == 0 and r.hlen("unacked") == 6


def test_an_ingest_whose_accept_refuses_waits_without_spinning(url: str) -> None:
    """A training worker's intake asks whether Celery's side is idle: while it is not, the loop
    looks again every 0.1 s, not as fast as it can (that spin once took a core from training)."""
    calls = []

    def accept() -> bool:
        calls.append(time.monotonic())
        return False

    ingest = make_ingest(url, FlakyRuntime({}), accept=accept).start()
    try:
        time.sleep(1.0)
        assert 3 <= len(calls) <= 25, len(calls)
        assert ingest.health(stall_s=5.0) is None  # waiting is alive
    finally:
        ingest.stop(timeout=1)
