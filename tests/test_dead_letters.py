"""The dead-letter store on real Redis: a real Celery message taken off its queue list, kept,
listed, shown, requeued byte for byte onto the list of its priority; garbage too; purge;
the `conveyor dlq` commands."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from conftest import empty_db
from typer.testing import CliRunner

from producers.cli import app
from producers.client import Client
from shared import dead_letters
from shared.celery_config import celery_priority
from shared.dead_letters import DeadLetter
from shared.jobs import ClassifyJob
from shared.names import DEAD_LETTER_KEY, QUEUES, TASKS, priority_list
from shared.settings import Settings

DB = 12
QUEUE = QUEUES["classify"]


@pytest.fixture()
def db_url(redis_url: str) -> Iterator[str]:
    yield from empty_db(redis_url, DB)


@pytest.fixture()
def r(db_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(db_url)
    yield client
    client.close()


def real_message(db_url: str, tmp_path: Path, priority: int) -> tuple[str, bytes]:
    """Send a job with Celery and take its raw message off the queue list, as a worker would."""
    with Client(settings=Settings(redis_url=db_url, home=tmp_path)) as client:
        handle = client.submit(
            ClassifyJob(texts=["Snow closed the roads."], labels=["weather", "sports"], priority=priority)
        )
        raw = client.redis.rpop(priority_list(QUEUE, celery_priority(priority)))
    assert isinstance(raw, bytes)
    return handle.id, raw


def test_round_trip_requeues_the_exact_message_onto_its_priority_list(
    db_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    job_id, raw = real_message(db_url, tmp_path, priority=7)
    assert json.loads(raw)["properties"]["priority"] == celery_priority(7) == 2
    letter = DeadLetter(
        id=job_id, queue=QUEUE, task=TASKS["classify"], reason="TransientError: out of memory, 3 tries", retries=3,
        message=dead_letters.raw_message_text(raw),
    )  # fmt: skip
    pipe = r.pipeline()
    dead_letters.add(pipe, letter)  # inside a pipeline, as a worker does beside its ack
    pipe.execute()

    listed = dead_letters.list_letters(r)
    assert [x.id for x in listed] == [job_id] and listed[0].reason.startswith("TransientError")
    shown = dead_letters.get(r, job_id)
    assert shown == letter and shown.raw_bytes() == raw

    assert dead_letters.requeue(r, job_id) == QUEUE
    target = priority_list(QUEUE, 2)
    assert r.lrange(target, 0, -1) == [raw]  # byte-identical, on the priority-2 list only
    assert all(r.llen(priority_list(QUEUE, p)) == 0 for p in range(10) if p != 2)
    assert dead_letters.get(r, job_id) is None and dead_letters.count(r) == 0
    with pytest.raises(dead_letters.DeadLetterNotFound):
        dead_letters.requeue(r, job_id)


def test_garbage_keeps_its_bytes_and_goes_back_to_priority_0(r: redis.Redis) -> None:
    now = datetime.now(UTC)
    garbage = {
        "bytes": b"\xff\xfe\x00not json",
        "nested": b"[" * 100_000 + b"]" * 100_000,
        "null": b"null",
        "empty": b"",
    }
    for i, (name, raw) in enumerate(garbage.items()):
        dead_letters.add(
            r,
            DeadLetter(
                id=name, queue=QUEUE, reason="not a Celery message", failed_at=now + timedelta(seconds=i),
                message=dead_letters.raw_message_text(raw),
            ),
        )  # fmt: skip
    assert [x.id for x in dead_letters.list_letters(r, limit=3)] == ["empty", "null", "nested"]  # newest first
    moved = dead_letters.requeue_all(r)
    assert moved == {QUEUE: 4}
    # Oldest first with LPUSH: the list's right end, where kombu takes from, holds the oldest.
    assert r.lrange(QUEUE, 0, -1) == list(reversed(list(garbage.values())))


def test_the_store_keeps_at_most_its_cap(r: redis.Redis) -> None:
    start = datetime.now(UTC)
    for i in range(5):
        letter = DeadLetter(id=f"m{i}", queue=QUEUE, reason="x", failed_at=start + timedelta(seconds=i), message="{}")
        dead_letters.add(r, letter, cap=3)
    assert [x.id for x in dead_letters.list_letters(r)] == ["m4", "m3", "m2"]
    assert dead_letters.count(r) == 3
    pipe = r.pipeline()  # in a pipeline, add queues its writes and trim follows
    for i in range(5, 7):
        letter = DeadLetter(id=f"m{i}", queue=QUEUE, reason="x", failed_at=start + timedelta(seconds=i), message="{}")
        dead_letters.add(pipe, letter, cap=3)
    pipe.execute()
    assert dead_letters.trim(r, cap=3) == 2
    assert [x.id for x in dead_letters.list_letters(r)] == ["m6", "m5", "m4"] and dead_letters.count(r) == 3


def test_an_unreadable_entry_is_shown_not_requeued(r: redis.Redis) -> None:
    r.hset(DEAD_LETTER_KEY, "odd", b"not an entry")
    shown = dead_letters.get(r, "odd")
    assert shown is not None and "unreadable" in shown.reason and shown.message == "not an entry"
    with pytest.raises(dead_letters.UnreadableDeadLetter):
        dead_letters.requeue(r, "odd")
    assert dead_letters.purge(r) == 1 and dead_letters.count(r) == 0


def test_cli(db_url: str, r: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_REDIS_URL", db_url)
    job_id, raw = real_message(db_url, tmp_path, priority=9)
    dead_letters.add(r, DeadLetter(id=job_id, queue=QUEUE, reason="retries exhausted", message=raw.decode()))
    dead_letters.add(r, DeadLetter(id="junk", queue=QUEUE, reason="not JSON", message="junk"))
    runner = CliRunner()

    out = runner.invoke(app, ["dlq", "list"])
    assert out.exit_code == 0, out.output
    listed = json.loads(out.output)
    assert listed["count"] == 2 and {x["id"] for x in listed["letters"]} == {job_id, "junk"}

    out = runner.invoke(app, ["dlq", "show", job_id])
    assert out.exit_code == 0 and json.loads(out.output)["message"] == raw.decode()
    out = runner.invoke(app, ["dlq", "show", "nope"])
    assert out.exit_code == 1 and "no dead letter 'nope'" in out.output

    out = runner.invoke(app, ["dlq", "requeue", job_id])
    assert out.exit_code == 0 and json.loads(out.output) == {"id": job_id, "requeued": True, "queue": QUEUE}
    assert r.lrange(QUEUE, 0, -1) == [raw]  # Conveyor priority 9 is Celery's 0: the queue's own list

    out = runner.invoke(app, ["dlq", "requeue"])
    assert out.exit_code == 2 and "--all" in out.output
    out = runner.invoke(app, ["dlq", "purge"])
    assert out.exit_code == 0 and json.loads(out.output) == {"purged": 1}
