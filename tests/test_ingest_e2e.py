"""The inference fast path end to end: a pre-filled queue of mixed jobs (from Conveyor's SDK,
a bare Celery app and raw Redis pushes) drained by a real worker process; a SIGKILL while the
worker holds a bulk of jobs; `celery inspect` while it is busy.

Each test module here gets its own Redis, so the session's worker does not drain the queue
before the worker under test starts.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from e2e_helpers import LABELS, TOPICAL, celery_children, start_worker, wait_for

from producers.client import Client
from producers.local_redis import LocalRedis
from shared.jobs import ClassifyJob
from shared.names import DEAD_LETTER_KEY

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = LocalRedis(tmp_path_factory.mktemp("ingest-redis"))
    yield server.start()
    server.stop()


@pytest.fixture(scope="module")
def env(own_redis: str, conveyor_env: dict[str, str], prepared_models: Path) -> dict[str, str]:
    return dict(
        conveyor_env,
        CONVEYOR_REDIS_URL=own_redis,
        CONVEYOR_MAX_BATCH_SIZE="16",
        CONVEYOR_VISIBILITY_TIMEOUT_S="6",
        CONVEYOR_MODEL_DIR=str(prepared_models),
    )


@pytest.fixture(scope="module")
def sdk(env: dict[str, str]) -> Iterator[Client]:
    c = Client(redis_url=env["CONVEYOR_REDIS_URL"])
    yield c
    c.close()


@pytest.fixture(scope="module")
def bare(env: dict[str, str]) -> Iterator[Celery]:
    """A Celery client that knows nothing of Conveyor: broker, backend, JSON."""
    app = Celery("bare", broker=env["CONVEYOR_REDIS_URL"], backend=env["CONVEYOR_REDIS_URL"])
    app.conf.update(task_serializer="json", accept_content=["json"], result_accept_content=["json"])
    yield app
    app.close()


def top_label(result: dict[str, Any]) -> str:
    return str(result["results"][0]["labels"][0]["label"])


def test_a_prefilled_queue_of_mixed_jobs_drains_with_every_result_or_a_clear_error(
    env: dict[str, str], sdk: Client, bare: Celery, tmp_path: Path
) -> None:
    r = redis.Redis.from_url(env["CONVEYOR_REDIS_URL"])
    expected: dict[str, str] = {}  # job id -> label, or "!" + a fragment of the error
    # 680 ordinary jobs at Conveyor priority 0, queued first.
    low = [ClassifyJob(texts=[TOPICAL[n % 6][0]], labels=LABELS, priority=0) for n in range(680)]
    sdk.submit_many(low)
    for n, job in enumerate(low):
        expected[job.id] = TOPICAL[n % 6][1]
    # Idempotent duplicates: the same key returns the first job's handle; nothing new is sent.
    keyed = [ClassifyJob(texts=[TOPICAL[n % 6][0]], labels=LABELS, idempotency_key=f"k{n}") for n in range(50)]
    first = sdk.submit_many(keyed)
    again = sdk.submit_many([ClassifyJob(**j.model_dump(exclude={"id"})) for j in keyed])
    assert [h.id for h in first] == [h.id for h in again]
    for n, job in enumerate(keyed):
        expected[job.id] = TOPICAL[n % 6][1]
    # Malformed jobs from a client that knows nothing of Conveyor.
    malformed: list[tuple[Any, str]] = [
        ({"labels": LABELS}, "texts"),
        ({"texts": "not a list", "labels": LABELS}, "texts"),
        ({"texts": ["x"], "labels": ["only-one"]}, "labels"),
        ({"texts": [""], "labels": LABELS}, "texts"),
        ({"texts": ["x"], "labels": LABELS, "top_k": -3}, "top_k"),
        ({"texts": ["x"] * 10_000, "labels": LABELS}, "texts"),
        ({"texts": ["x"], "labels": LABELS, "priority": 42}, "priority"),
        ("a string, not an object", "JSON object"),
    ]
    for n in range(160):
        body, fragment = malformed[n % len(malformed)]
        res = bare.send_task("conveyor.classify", args=[body], queue="conveyor.classify")
        expected[res.id] = "!" + fragment
    # Deadlines that passed before any worker could start them.
    past = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    for _ in range(40):
        res = bare.send_task(
            "conveyor.classify", args=[{"texts": ["x"], "labels": LABELS, "deadline": past}], queue="conveyor.classify"
        )
        expected[res.id] = "!deadline"
    # Tasks that inference workers do not serve, sent to an inference queue.
    for _ in range(20):
        res = bare.send_task("conveyor.nonexistent", args=[{}], queue="conveyor.classify")
        expected[res.id] = "!not served"
    # Raw entries that are not Celery messages at all.
    garbage = [b"garbage", b"", b"null", b"[]", b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe\x00", b'{"body": 1}']
    for n in range(70):
        r.lpush("conveyor.classify", garbage[n % len(garbage)])
    # 50 urgent jobs (Conveyor priority 9), queued behind all of the above.
    urgent = [ClassifyJob(texts=[TOPICAL[n % 6][0]], labels=LABELS, priority=9) for n in range(50)]
    sdk.submit_many(urgent)
    for n, job in enumerate(urgent):
        expected[job.id] = TOPICAL[n % 6][1]
    assert len(expected) + 70 >= 1000

    worker = start_worker(env, tmp_path / "worker.log", sdk)
    try:
        results = wait_for(r, list(expected), timeout=600)
        for job_id, want in expected.items():
            got = results[job_id]
            if want.startswith("!"):
                assert got["status"] == "FAILURE", (job_id, got)
                message = " ".join(got["result"]["exc_message"])
                assert want[1:] in message, (want, message)
            else:
                assert got["status"] == "SUCCESS", (job_id, got)
                assert top_label(got["result"]) == want, (job_id, got["result"])
                assert got["name"] == "conveyor.classify" and got["worker"].startswith("cpu@")
        # Urgent jobs, though queued last, finished before almost every ordinary one.
        done = {i: datetime.fromisoformat(results[i]["date_done"]) for i in expected}
        last_urgent = max(done[j.id] for j in urgent)
        earlier_low = sum(1 for j in low if done[j.id] < last_urgent)
        assert earlier_low <= 2 * 16, f"{earlier_low} priority-0 jobs finished before the last priority-9 one"
        # Nothing left held, every raw entry kept as a dead letter, and the worker never restarted.
        assert r.hlen("unacked") == 0
        assert r.hlen(DEAD_LETTER_KEY) >= 70 + 20
        assert celery_children(worker.proc.pid) and "exited with" not in worker.tail(1_000_000)
    finally:
        worker.stop()


def test_sigkill_while_holding_a_bulk_loses_nothing(env: dict[str, str], sdk: Client, tmp_path: Path) -> None:
    r = redis.Redis.from_url(env["CONVEYOR_REDIS_URL"])
    worker = start_worker(env, tmp_path / "worker.log", sdk)
    try:
        jobs = [ClassifyJob(texts=[TOPICAL[n % 6][0]] * 4, labels=LABELS) for n in range(150)]
        sdk.submit_many(jobs)
        # Wait until the worker holds jobs (registered in kombu's unacked hash), then kill it.
        end = time.monotonic() + 60
        while r.hlen("unacked") == 0 and time.monotonic() < end:
            time.sleep(0.02)
        held = r.hlen("unacked")
        assert held > 0
        (pid,) = celery_children(worker.proc.pid)
        os.kill(pid, signal.SIGKILL)
        results = wait_for(r, [j.id for j in jobs], timeout=300)
        for n, job in enumerate(jobs):
            got = results[job.id]
            assert got["status"] == "SUCCESS", got
            assert [c["labels"][0]["label"] for c in got["result"]["results"]] == [TOPICAL[n % 6][1]] * 4
        assert r.hlen("unacked") == 0 and r.zcard("unacked_index") == 0
        assert len(celery_children(worker.proc.pid)) == 1  # the supervisor started a new one
    finally:
        worker.stop()


def test_celery_inspect_answers_while_the_worker_is_busy(env: dict[str, str], sdk: Client, tmp_path: Path) -> None:
    worker = start_worker(env, tmp_path / "worker.log", sdk)
    try:
        jobs = [ClassifyJob(texts=[TOPICAL[n % 6][0]] * 32, labels=LABELS) for n in range(20)]
        handles = sdk.submit_many(jobs)
        time.sleep(1.0)
        inspect = sdk.app.control.inspect(timeout=5)
        active = inspect.active() or {}
        queues = inspect.active_queues() or {}
        assert active, "no worker answered `inspect active` while busy"
        listed = {task["id"] for tasks in active.values() for task in tasks}
        assert listed & {j.id for j in jobs}, active
        names = {q["name"] for qs in queues.values() for q in qs}
        assert {"conveyor.classify", "conveyor.bulk.classify"} <= names
        for handle in handles:
            handle.result_json(timeout=300)
        stats = inspect.stats() or {}
        assert any(s.get("total", {}).get("conveyor.classify", 0) >= 20 for s in stats.values()), stats
    finally:
        worker.stop()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_flower_shows_fast_path_jobs_with_their_state_and_result(
    env: dict[str, str], sdk: Client, tmp_path: Path
) -> None:
    import subprocess
    import sys
    import urllib.request

    port = free_port()
    log = (tmp_path / "flower.log").open("wb")
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "producers.flower_app", "flower", f"--port={port}",
         "--address=127.0.0.1"],
        env=dict(env, FLOWER_UNAUTHENTICATED_API="true"), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    worker = start_worker(env, tmp_path / "worker.log", sdk)

    def get(path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return json.loads(response.read())

    try:
        end = time.monotonic() + 60
        while True:  # Flower is listening (and subscribed to events) before the jobs are sent
            try:
                get("/api/workers")
                break
            except OSError:
                assert time.monotonic() < end, (tmp_path / "flower.log").read_text()[-3000:]
                time.sleep(0.5)
        good = [ClassifyJob(texts=[TOPICAL[n % 6][0]], labels=LABELS) for n in range(12)]
        bad = Celery("bare", broker=env["CONVEYOR_REDIS_URL"], backend=env["CONVEYOR_REDIS_URL"])
        bad.conf.update(task_serializer="json")
        failed = bad.send_task("conveyor.classify", args=[{"texts": [], "labels": LABELS}], queue="conveyor.classify")
        for handle in sdk.submit_many(good):
            handle.result_json(timeout=120)
        end = time.monotonic() + 30
        while True:
            tasks = get("/api/tasks")
            states = {job.id: tasks.get(job.id, {}).get("state") for job in good}
            if set(states.values()) == {"SUCCESS"} and tasks.get(failed.id, {}).get("state") == "FAILURE":
                break
            assert time.monotonic() < end, states
            time.sleep(0.5)
        assert tasks[good[0].id]["name"] == "conveyor.classify"
        assert "InvalidJob" in tasks[failed.id]["exception"]
        result = get(f"/api/task/result/{good[0].id}")
        assert result["state"] == "SUCCESS" and result["result"]["job_id"] == good[0].id
    finally:
        worker.stop()
        flower.terminate()
        flower.wait(30)
        log.close()


def test_interactive_jobs_overtake_a_bulk_backlog(env: dict[str, str], sdk: Client, tmp_path: Path) -> None:
    r = redis.Redis.from_url(env["CONVEYOR_REDIS_URL"])
    worker = start_worker(env, tmp_path / "worker.log", sdk)
    try:
        bulk = [ClassifyJob(texts=[TOPICAL[n % 6][0]] * 64, labels=LABELS) for n in range(8)]
        sdk.submit_many(bulk, queue="conveyor.bulk.classify")
        end = time.monotonic() + 60
        while r.hlen("unacked") == 0:  # the bulk run has started
            assert time.monotonic() < end
            time.sleep(0.02)
        urgent = [ClassifyJob(texts=[TOPICAL[n % 6][0]], labels=LABELS) for n in range(3)]
        sdk.submit_many(urgent)
        results = wait_for(r, [j.id for j in bulk + urgent], timeout=600)
        done = {i: datetime.fromisoformat(results[i]["date_done"]) for i in results}
        last_urgent = max(done[j.id] for j in urgent)
        bulk_before = sum(1 for j in bulk if done[j.id] <= last_urgent)
        # Ahead of them: at most the two bulk chunks the worker already held (one running, one ready).
        assert bulk_before <= 2, f"{bulk_before} bulk chunks finished before the interactive jobs"
        assert all(results[j.id]["status"] == "SUCCESS" for j in bulk + urgent)
    finally:
        worker.stop()
