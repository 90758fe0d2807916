"""Faults with real parts: Redis killed and restarted under a busy worker, a worker frozen
past the visibility timeout, cancels that outlive a worker restart, and a fuzz of malformed
messages. Every job must finish exactly once from the producer's view (a duplicate run is
harmless: same labels), nothing stays unacknowledged, and the worker never restarts.

Each test here gets its own Redis (so it can be killed) and its own worker.
"""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from conftest import WorkerProcess
from e2e_helpers import LABELS, TOPICAL, celery_children, start_worker, wait_for

from producers.client import Client
from producers.local_redis import LocalRedis
from shared.dead_letters import DeadLetter
from shared.jobs import ClassifyJob
from shared.names import DEAD_LETTER_KEY

pytestmark = pytest.mark.slow


class Server:
    def __init__(self, home: Path) -> None:
        self.redis = LocalRedis(home, record_url=False)
        self.url = self.redis.start()

    def kill(self, signum: int) -> None:
        assert self.redis.child is not None
        os.kill(self.redis.child.pid, signum)
        self.redis.child.process.wait(30)

    def restart(self) -> None:
        self.redis.start()  # the same port, password and AOF


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "redis")
    yield s
    s.redis.stop()


@pytest.fixture
def env(server: Server, conveyor_env: dict[str, str], prepared_models: Path) -> dict[str, str]:
    return dict(
        conveyor_env,
        CONVEYOR_REDIS_URL=server.url,
        CONVEYOR_MAX_BATCH_SIZE="16",
        CONVEYOR_VISIBILITY_TIMEOUT_S="6",
        CONVEYOR_MODEL_DIR=str(prepared_models),
    )


@pytest.fixture
def sdk(env: dict[str, str]) -> Iterator[Client]:
    c = Client(redis_url=env["CONVEYOR_REDIS_URL"])
    yield c
    c.close()


def jobs_with_labels(n: int, texts_per_job: int = 2) -> tuple[list[ClassifyJob], dict[str, str]]:
    jobs = [ClassifyJob(texts=[TOPICAL[i % 6][0]] * texts_per_job, labels=LABELS) for i in range(n)]
    return jobs, {job.id: TOPICAL[i % 6][1] for i, job in enumerate(jobs)}


def assert_all_correct(results: dict[str, dict[str, Any]], want: dict[str, str]) -> None:
    for job_id, label in want.items():
        got = results[job_id]
        assert got["status"] == "SUCCESS", got
        assert {c["labels"][0]["label"] for c in got["result"]["results"]} == {label}


def wait_until_held(r: redis.Redis, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while r.hlen("unacked") == 0:
        assert time.monotonic() < end, "the worker never took any job"
        time.sleep(0.02)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_jobs_held_and_queued_finish_after_redis_restarts(
    signum: int, server: Server, env: dict[str, str], sdk: Client, tmp_path: Path
) -> None:
    r = redis.Redis.from_url(server.url)
    worker = start_worker(env, tmp_path / "worker.log", sdk)
    try:
        (pid,) = celery_children(worker.proc.pid)
        jobs, want = jobs_with_labels(200)
        sdk.submit_many(jobs)
        wait_until_held(r)
        server.kill(signum)
        time.sleep(3.0)  # the worker meets a dead Redis: its loops back off and retry
        server.restart()
        results = wait_for(redis.Redis.from_url(server.url), list(want), timeout=300)
        assert_all_correct(results, want)
        # The same producer, without being told, reconnects too.
        again = sdk.submit(ClassifyJob(texts=[TOPICAL[0][0]], labels=LABELS)).result_json(timeout=120)
        assert again["results"][0]["labels"][0]["label"] == TOPICAL[0][1]
        r = redis.Redis.from_url(server.url)
        end = time.monotonic() + 20  # the last acknowledgements land just after the last results
        while r.hlen("unacked") and time.monotonic() < end:
            time.sleep(0.2)
        assert r.hlen("unacked") == 0
        assert celery_children(worker.proc.pid) == [pid], "the worker was restarted"
    finally:
        worker.stop()


def test_a_worker_frozen_past_the_visibility_timeout_loses_and_doubles_nothing(
    env: dict[str, str], sdk: Client, tmp_path: Path
) -> None:
    r = redis.Redis.from_url(env["CONVEYOR_REDIS_URL"])
    worker = WorkerProcess(
        dict(env, CONVEYOR_INSTANCES_PER_DEVICE="2"), tmp_path / "worker.log", ["--only", "inference"]
    )
    try:
        end = time.monotonic() + 180
        while len(sdk.wait_for_workers(180, ["conveyor.classify"])) < 2:
            assert time.monotonic() < end
            time.sleep(0.5)
        jobs, want = jobs_with_labels(120)
        sdk.submit_many(jobs)
        wait_until_held(r)
        frozen = celery_children(worker.proc.pid)[0]
        os.kill(frozen, signal.SIGSTOP)
        time.sleep(6 + 10)  # past the visibility timeout and the other worker's restore sweep
        os.kill(frozen, signal.SIGCONT)
        results = wait_for(r, list(want), timeout=300)
        assert_all_correct(results, want)
        end = time.monotonic() + 20
        while r.hlen("unacked") and time.monotonic() < end:
            time.sleep(0.2)
        assert r.hlen("unacked") == 0 and r.llen("conveyor.classify") == 0
        assert frozen in celery_children(worker.proc.pid)
    finally:
        worker.stop()


def test_a_cancelled_queued_job_never_runs_even_after_a_worker_restart(
    env: dict[str, str], sdk: Client, tmp_path: Path
) -> None:
    r = redis.Redis.from_url(env["CONVEYOR_REDIS_URL"])
    jobs, want = jobs_with_labels(40, texts_per_job=1)
    handles = sdk.submit_many(jobs)  # no worker yet: all queued
    cancelled = {h.id for h in handles[::2]}
    for job_id in cancelled:
        sdk.cancel(job_id)
    worker = start_worker(env, tmp_path / "worker.log", sdk)  # a worker that never saw the revoke broadcast
    try:
        results = wait_for(r, list(want), timeout=300)
        for job_id, label in want.items():
            got = results[job_id]
            if job_id in cancelled:
                assert got["status"] == "REVOKED" and got["result"]["exc_type"] == "JobCancelled", got
            else:
                assert got["status"] == "SUCCESS" and got["result"]["results"][0]["labels"][0]["label"] == label
    finally:
        worker.stop()


SECRET = "TOPSECRET-7f3a-do-not-echo"


def malformed_messages(rng: random.Random, secret_path: str, good_body: dict[str, Any]) -> list[tuple[str, Any]]:
    """(how, what): 'task' bodies go through Celery's send_task, 'raw' entries straight onto the list."""
    out: list[tuple[str, Any]] = []
    hostile = [
        {"texts": ["x"], "labels": LABELS, "label_template": t} for t in ("{}{x}", "{0}{}", "{{}}", "{", "no slot")
    ]
    bodies: list[Any] = [
        *hostile,
        {"texts": [], "labels": LABELS},
        {"texts": ["x"] * 1_000, "labels": LABELS},
        {"texts": ["y" * 30_000], "labels": LABELS},
        {"texts": [["nested", ["deeper"]]], "labels": LABELS},
        {"texts": ["x"], "labels": LABELS, "top_k": "lots"},
        {"texts": ["x"], "labels": LABELS, "deadline": "yesterday"},
        {"texts": ["x"], "labels": LABELS, "id": "has spaces\nand newlines"},
        {"texts": ["x"], "labels": LABELS, "model": "../../etc/passwd"},
        {"users": ["u"], "model": secret_path},
        None,
        42,
        "a string",
        [1, 2, 3],
        {"job": {"texts": "x"}},
    ]
    for _ in range(700):
        out.append(("task", rng.choice(bodies)))
    for _ in range(100):  # transcribe paths: secrets inside and outside the input roots, garbage audio
        choice = rng.choice(
            [
                {"audio_path": secret_path},
                {"audio_path": "/etc/shadow"},
                {"audio_path": "/proc/self/environ"},
                {"audio_b64": base64.b64encode(SECRET.encode()).decode()},
                {"audio_b64": "not base64 at all"},
            ]
        )
        out.append(("transcribe", choice))
    envelope = {
        "body": base64.b64encode(json.dumps([[good_body], {}, {}]).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": "conveyor.classify", "id": "x", "retries": 0},
        "properties": {
            "delivery_info": {"exchange": "", "routing_key": "conveyor.classify"},
            "body_encoding": "base64",
        },
    }
    for n in range(260):
        kind = n % 13
        e = json.loads(json.dumps(envelope))
        e["headers"]["id"] = f"fuzz-{n}"
        e["properties"]["delivery_tag"] = f"fuzz-tag-{n}"
        if kind == 0:
            raw: Any = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
        elif kind == 1:
            raw = b"[" * 50_000 + b"]" * 50_000
        elif kind == 2:
            e["content-type"] = "application/x-python-serialize"  # pickle: refused unread
            e["body"] = base64.b64encode(b"\x80\x04cos\nsystem\n.").decode()
            raw = json.dumps(e)
        elif kind == 3:
            e["content-type"] = "application/x-yaml"
            raw = json.dumps(e)
        elif kind == 4:
            e["body"] = "%%% not base64 %%%"
            raw = json.dumps(e)
        elif kind == 5:
            e["body"] = base64.b64encode(b"not json").decode()
            raw = json.dumps(e)
        elif kind == 6:
            e["body"] = base64.b64encode(json.dumps({"args": 1}).encode()).decode()
            raw = json.dumps(e)
        elif kind == 7:
            e["headers"]["task"] = "celery.backend_cleanup"
            raw = json.dumps(e)
        elif kind == 8:
            del e["headers"]["id"]
            raw = json.dumps(e)
        elif kind == 9:
            raw = json.dumps({"properties": "nope", "body": None})
        elif kind == 10:
            raw = json.dumps(["a", "list", {"of": "things"}])
        elif kind == 11:
            raw = "null"
        else:
            e["body"] = base64.b64encode(
                json.dumps([[{"texts": ["x"] * 5, "labels": ["a"]}], {}, {}]).encode()
            ).decode()
            raw = json.dumps(e)
        out.append(("raw", raw))
    rng.shuffle(out)
    return out


def test_a_fuzz_of_malformed_messages_never_stops_the_worker(
    env: dict[str, str], sdk: Client, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    rng = random.Random(11)
    secret = tmp_path_factory.getbasetemp() / "secret.txt"  # inside the test input roots
    secret.write_text(f"root:{SECRET}:19000:0:99999:7:::\n")
    r = redis.Redis.from_url(env["CONVEYOR_REDIS_URL"])
    bare = Celery("bare", broker=env["CONVEYOR_REDIS_URL"], backend=env["CONVEYOR_REDIS_URL"])
    bare.conf.update(task_serializer="json", accept_content=["json"])
    good_body = {"texts": [TOPICAL[0][0]], "labels": LABELS}
    worker = start_worker(env, tmp_path / "worker.log", sdk)
    try:
        (pid,) = celery_children(worker.proc.pid)
        bad_ids: list[str] = []
        good: dict[str, str] = {}
        raw_count = 0
        messages = malformed_messages(rng, str(secret), good_body)
        for n, (how, what) in enumerate(messages):
            if how == "task":
                bad_ids.append(bare.send_task("conveyor.classify", args=[what], queue="conveyor.classify").id)
            elif how == "transcribe":
                bad_ids.append(bare.send_task("conveyor.transcribe", args=[what], queue="conveyor.transcribe").id)
            else:
                r.lpush("conveyor.classify", what)
                raw_count += 1
            if n % 10 == 0:  # good jobs interleaved with the bad ones
                job = ClassifyJob(texts=[TOPICAL[n % 6][0]], labels=LABELS)
                sdk.submit(job)
                good[job.id] = TOPICAL[n % 6][1]
        assert len(messages) >= 1000
        results = wait_for(r, bad_ids + list(good), timeout=600)
        for job_id in bad_ids:
            got = results[job_id]
            assert got["status"] == "FAILURE", got
            message = " ".join(map(str, got["result"]["exc_message"]))
            assert got["result"]["exc_type"] in ("InvalidJob", "ModelNotFound"), got["result"]
            assert SECRET not in message and "root:" not in message and " at 0x" not in message, message
            assert len(message) < 5000
        assert_all_correct({k: results[k] for k in good}, good)
        for k in good:
            assert len(results[k]["result"]["results"]) == 1
        # Every raw entry is failed on its id (where it had one) or kept as a dead letter; none is left behind.
        end = time.monotonic() + 30
        while (r.llen("conveyor.classify") or r.hlen("unacked")) and time.monotonic() < end:
            time.sleep(0.2)
        assert r.llen("conveyor.classify") == 0 and r.hlen("unacked") == 0
        letters = [DeadLetter.from_json(v) for v in r.hvals(DEAD_LETTER_KEY)]
        assert len(letters) >= raw_count - 30  # the raw entries that were valid jobs ran (kind 12 fails alone)
        assert all(letter.reason and SECRET not in letter.reason for letter in letters)
        raw_entries = {m for how, m in messages if how == "raw"}
        kept = {letter.raw_bytes() for letter in letters}
        assert {m for m in raw_entries if isinstance(m, bytes)} <= kept  # byte for byte, ready to requeue
        for n in range(260):  # raw envelopes with an id: a clear error on that id, never PENDING
            got_raw = r.get(f"celery-task-meta-fuzz-{n}")
            if n % 13 in (2, 3, 4, 5, 6, 7, 12):
                assert got_raw is not None and json.loads(got_raw)["status"] == "FAILURE", n
        assert celery_children(worker.proc.pid) == [pid], "the worker restarted"
        assert "Unrecoverable error" not in worker.tail(2_000_000)
    finally:
        worker.stop()


def test_a_worker_alive_but_not_consuming_is_restarted(env: dict[str, str], sdk: Client, tmp_path: Path) -> None:
    worker = start_worker(dict(env, CONVEYOR_WORKER_STALL_S="5"), tmp_path / "worker.log", sdk)
    try:
        (stuck,) = celery_children(worker.proc.pid)
        os.kill(stuck, signal.SIGSTOP)  # alive (its process is there) but consuming nothing
        jobs, want = jobs_with_labels(10, texts_per_job=1)
        sdk.submit_many(jobs)
        end = time.monotonic() + 120
        while celery_children(worker.proc.pid) in ([stuck], []):
            assert time.monotonic() < end, "the stalled worker was not replaced:\n" + worker.tail()
            time.sleep(0.5)
        assert stuck not in celery_children(worker.proc.pid)
        assert_all_correct(wait_for(redis.Redis.from_url(env["CONVEYOR_REDIS_URL"]), list(want), 300), want)
    finally:
        worker.stop()
