"""Regressions for each way hostile input used to win, with real processes and real signals: a
lone surrogate that stopped the result writer, raw bytes in an id or a delivery tag, shapes that
kombu's restore drops, undecodable messages that left their client on PENDING, a job past its
time limit redelivered forever, a backlog of large jobs ahead of an urgent one, and a SIGTERM
that left held jobs waiting for the visibility timeout."""

from __future__ import annotations

import base64
import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from e2e_helpers import LABELS, TOPICAL, celery_children, start_worker, wait_for

from producers.client import Client
from producers.local_redis import LocalRedis
from shared.jobs import ClassifyJob
from shared.names import DEAD_LETTER_KEY

pytestmark = pytest.mark.slow

VISIBILITY_S = 60  # long: every test here must finish well inside it, or it is waiting for kombu's restore


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = LocalRedis(tmp_path_factory.mktemp("hostile-redis"), record_url=False)
    yield server.start()
    server.stop()


@pytest.fixture(scope="module")
def env(url: str, conveyor_env: dict[str, str], prepared_models: Path) -> dict[str, str]:
    return dict(
        conveyor_env,
        CONVEYOR_REDIS_URL=url,
        CONVEYOR_MODEL_DIR=str(prepared_models),
        CONVEYOR_VISIBILITY_TIMEOUT_S=str(VISIBILITY_S),
        CONVEYOR_MAX_BATCH_SIZE="8",
        CONVEYOR_INFERENCE_TIME_LIMIT_S="3",
        CONVEYOR_MAX_DELIVERIES="2",
    )


@pytest.fixture(scope="module")
def sdk(env: dict[str, str]) -> Iterator[Client]:
    c = Client(redis_url=env["CONVEYOR_REDIS_URL"])
    yield c
    c.close()


@pytest.fixture(scope="module")
def worker(env: dict[str, str], sdk: Client, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    proc = start_worker(env, tmp_path_factory.mktemp("hostile-worker") / "worker.log", sdk)
    yield proc
    proc.stop()


@pytest.fixture
def r(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def celery_message(task: str, args: list[Any], job_id: str, **headers: Any) -> dict[str, Any]:
    """A Celery protocol-2 message as kombu lays it in Redis."""
    body = base64.b64encode(json.dumps([args, {}, {}]).encode()).decode()
    return {
        "body": body, "content-encoding": "utf-8", "content-type": "application/json",
        "headers": {"lang": "py", "task": task, "id": job_id, "retries": 0, **headers},
        "properties": {"delivery_info": {"exchange": "", "routing_key": "conveyor.classify"}, "priority": 4,
                       "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())},
    }  # fmt: skip


def good_job() -> dict[str, Any]:
    return {"texts": [TOPICAL[0][0]], "labels": LABELS}


def meta_at(r: redis.Redis, key: bytes, timeout: float = 30) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        raw: Any = r.get(b"celery-task-meta-" + key)
        if raw is not None and json.loads(raw)["status"] in ("SUCCESS", "FAILURE", "REVOKED"):
            return dict(json.loads(raw))
        time.sleep(0.05)
    raise AssertionError(f"no final result under {key!r}")


def test_a_lone_surrogate_in_a_text_fails_that_job_and_the_worker_keeps_writing(
    worker: Any, sdk: Client, r: redis.Redis
) -> None:
    pids = celery_children(worker.proc.pid)
    bad = sdk.app.send_task("conveyor.classify", args=[{"texts": ["fine", "bad \ud800 text"], "labels": LABELS}],
                        queue="conveyor.classify")  # fmt: skip
    failed = meta_at(r, bad.id.encode())
    assert failed["status"] == "FAILURE" and failed["result"]["exc_type"] == "InvalidJob"
    assert "args.0.texts.1: not valid Unicode" in failed["result"]["exc_message"][0], failed
    # ... and the same worker goes on: many good jobs after it all succeed.
    jobs = [ClassifyJob(texts=[text], labels=LABELS) for text, _ in TOPICAL * 5]
    results = wait_for(r, [h.id for h in sdk.submit_many(jobs)], timeout=120)
    assert all(m["status"] == "SUCCESS" for m in results.values())
    assert celery_children(worker.proc.pid) == pids


def test_raw_bytes_in_an_id_get_a_failure_under_those_exact_bytes_and_spoil_no_neighbour(
    worker: Any, sdk: Client, r: redis.Redis
) -> None:
    neighbours = [ClassifyJob(texts=[TOPICAL[1][0]], labels=LABELS) for _ in range(5)]
    raw_id = b"job-\xff\xfe-" + uuid.uuid4().hex.encode()
    message = json.dumps(celery_message("conveyor.classify", [good_job()], "PLACEHOLDER")).encode()
    r.lpush("conveyor.classify", message.replace(b"PLACEHOLDER", raw_id))
    handles = sdk.submit_many(neighbours)
    started = time.monotonic()
    failed = meta_at(r, raw_id)
    assert failed["status"] == "FAILURE" and "UTF-8" in failed["result"]["exc_message"][0]
    results = wait_for(r, [h.id for h in handles], timeout=60)
    assert all(m["status"] == "SUCCESS" for m in results.values())
    assert time.monotonic() - started < VISIBILITY_S / 2  # nobody waited for a redelivery


def test_a_delivery_tag_of_raw_bytes_neither_stops_the_writer_nor_the_lease_keeper(
    worker: Any, sdk: Client, r: redis.Redis
) -> None:
    job_id = uuid.uuid4().hex
    message = celery_message("conveyor.classify", [good_job()], job_id)
    message["properties"]["delivery_tag"] = "TAG"
    r.lpush("conveyor.classify", json.dumps(message).encode().replace(b'"TAG"', b'"tag-\xff"'))
    job_id2 = uuid.uuid4().hex
    message2 = celery_message("conveyor.classify", [good_job()], job_id2)
    message2["properties"]["delivery_tag"] = "../../" + "x" * 500
    r.lpush("conveyor.classify", json.dumps(message2))
    # The first is not UTF-8: refused at intake with a FAILURE on its id. The second runs.
    assert meta_at(r, job_id.encode())["status"] == "FAILURE"
    assert meta_at(r, job_id2.encode())["status"] == "SUCCESS"
    again = sdk.submit(ClassifyJob(texts=[TOPICAL[2][0]], labels=LABELS)).result_json(timeout=60)
    assert again["results"][0]["labels"][0]["label"] == TOPICAL[2][1]
    assert r.hlen("unacked") == 0


@pytest.mark.parametrize(
    "shape",
    ["headers-array", "delivery-info-null", "protocol-1-headers-array", "body-not-base64", "type-marker"],
)
def test_messages_kombu_could_not_restore_are_failed_on_their_id_and_dead_lettered(
    shape: str, worker: Any, r: redis.Redis
) -> None:
    job_id = f"{shape}-{uuid.uuid4().hex}"
    message = celery_message("conveyor.classify", [good_job()], job_id)
    if shape == "headers-array":
        message["headers"] = ["not", "an", "object"]
        body = {"task": "conveyor.classify", "id": job_id, "args": [good_job()], "kwargs": {}}
        message["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    elif shape == "delivery-info-null":
        message["properties"]["delivery_info"] = None
    elif shape == "protocol-1-headers-array":
        message = {"body": json.dumps({"task": "conveyor.classify", "id": job_id, "args": [], "kwargs": {}}),
                   "content-type": "application/json", "headers": [1], "properties": {}}  # fmt: skip
    elif shape == "body-not-base64":
        message["body"] = "%%% not base64 %%%"
    else:
        message["headers"]["expires"] = {"__type__": "datetime", "__value__": "not a date"}
    before = r.hlen(DEAD_LETTER_KEY)
    r.lpush("conveyor.classify", json.dumps(message))
    failed = meta_at(r, job_id.encode())
    assert failed["status"] == "FAILURE" and failed["result"]["exc_type"] == "InvalidJob", failed
    end = time.monotonic() + 10
    while r.hlen(DEAD_LETTER_KEY) == before and time.monotonic() < end:
        time.sleep(0.05)
    assert r.hlen(DEAD_LETTER_KEY) == before + 1
    assert r.hlen("unacked") == 0


def test_empty_headers_and_properties_are_filed_restorably_and_run(worker: Any, r: redis.Redis) -> None:
    # cjson cannot tell [] from {}: the pop script files such a message as kombu's restore needs it.
    job_id = uuid.uuid4().hex
    body = json.dumps({"task": "conveyor.classify", "id": job_id, "args": [good_job()], "kwargs": {}})
    r.lpush("conveyor.classify", json.dumps({"body": body, "content-type": "application/json", "headers": [],
                                             "properties": []}))  # fmt: skip
    done = meta_at(r, job_id.encode())
    assert done["status"] == "SUCCESS", done
    assert done["result"]["results"][0]["labels"][0]["label"] == TOPICAL[0][1]


def test_an_undecodable_message_with_a_readable_id_leaves_no_client_pending(worker: Any, r: redis.Redis) -> None:
    job_id = uuid.uuid4().hex
    r.lpush("conveyor.classify", b'{"headers": {"id": "' + job_id.encode() + b'", "task": "conveyor.classify"}, oops')
    failed = meta_at(r, job_id.encode())
    assert failed["status"] == "FAILURE" and "not JSON" in failed["result"]["exc_message"][0]


def test_a_job_past_its_time_limit_is_dead_lettered_after_its_deliveries(
    worker: Any, sdk: Client, r: redis.Redis
) -> None:
    # 512 long texts: far more than 3 s of CPU for MiniLM, on any machine without a GPU.
    long_text = " ".join(["The central bank raised interest rates and stock markets fell sharply."] * 8)
    slow = sdk.submit(ClassifyJob(texts=[long_text] * 512, labels=LABELS))
    started = time.monotonic()
    failed = meta_at(r, slow.id.encode(), timeout=VISIBILITY_S)
    assert failed["status"] == "FAILURE", failed
    assert "delivered 3 times" in failed["result"]["exc_message"][0]
    assert time.monotonic() - started < VISIBILITY_S  # released at once each time, not by kombu's restore
    letters = [json.loads(v) for v in r.hvals(DEAD_LETTER_KEY)]
    assert any(x["id"] == slow.id for x in letters)
    # Nothing of it loops: no copy left on the queue or unacknowledged, and a new job runs promptly.
    time.sleep(1.0)
    assert r.llen("conveyor.classify") == 0
    quick = sdk.submit(ClassifyJob(texts=[TOPICAL[3][0]], labels=LABELS)).result_json(timeout=60)
    assert quick["results"][0]["labels"][0]["label"] == TOPICAL[3][1]


def test_an_urgent_job_overtakes_a_backlog_of_large_jobs(worker: Any, sdk: Client, r: redis.Redis) -> None:
    backlog = sdk.submit_many([ClassifyJob(texts=[TOPICAL[i % 6][0]] * 24, labels=LABELS, priority=1)
                               for i in range(60)])  # fmt: skip
    time.sleep(1.0)  # the worker is busy with the backlog

    def done() -> int:
        pipe = r.pipeline()
        for h in backlog:
            pipe.exists(f"celery-task-meta-{h.id}")
        return sum(pipe.execute())

    before = done()
    urgent = sdk.submit(ClassifyJob(texts=[TOPICAL[4][0]], labels=LABELS, priority=9))
    meta_at(r, urgent.id.encode(), timeout=60)
    overtaken_by = done() - before
    # Prefetch counts items (16 here: two batches of 8), not messages: the worker held one 24-text
    # job when the urgent one came, so at most that one (and one popped in the same instant) ran first.
    assert overtaken_by <= 2, f"{overtaken_by} backlog jobs finished between the urgent job's submit and its result"
    assert before < 60  # the backlog was really there
    wait_for(r, [h.id for h in backlog], timeout=300)


def test_sigterm_with_jobs_in_flight_puts_them_back_at_once(
    worker: Any, sdk: Client, r: redis.Redis, env: dict[str, str], tmp_path: Path
) -> None:
    jobs = [ClassifyJob(texts=[TOPICAL[i % 6][0]] * 4, labels=LABELS) for i in range(80)]
    handles = sdk.submit_many(jobs)
    end = time.monotonic() + 30
    while r.hlen("unacked") == 0:
        assert time.monotonic() < end
        time.sleep(0.02)
    (pid,) = celery_children(worker.proc.pid)
    started = time.monotonic()
    os.kill(pid, signal.SIGTERM)  # a warm stop: held jobs finish or go back to their queue
    results = wait_for(r, [h.id for h in handles], timeout=VISIBILITY_S)
    assert all(m["status"] == "SUCCESS" for m in results.values())
    assert time.monotonic() - started < VISIBILITY_S  # the restarted worker had them at once
    assert celery_children(worker.proc.pid) != [pid]  # it really stopped and was started again
    end = time.monotonic() + 10
    while r.hlen("unacked") and time.monotonic() < end:
        time.sleep(0.1)
    assert r.hlen("unacked") == 0
