"""Submit refuses what must not run: an idempotency key reused for other work, an explicit
job id sent twice, a queue over its depth bound. Real Redis (a database of its own, so the
jobs left queued here never reach the session's workers); no worker needed."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from conftest import empty_db

from producers.client import Client
from producers.submit_claims import payload_hash
from shared.errors import DuplicateJob, IdempotencyConflict, QueueFull
from shared.jobs import ClassifyJob
from shared.names import IDEMPOTENCY_KEY_PREFIX, JOB_ID_KEY_PREFIX, QUEUES, priority_list
from shared.settings import Settings

DB = 11


@pytest.fixture()
def db_url(redis_url: str) -> Iterator[str]:
    yield from empty_db(redis_url, DB)


def make_client(url: str, tmp_path: Path, **settings: object) -> Client:
    return Client(settings=Settings(redis_url=url, home=tmp_path, **settings))  # type: ignore[arg-type]


def job(text: str = "The striker scored.", **fields: object) -> ClassifyJob:
    return ClassifyJob(texts=[text], labels=["sports", "finance"], **fields)  # type: ignore[arg-type]


def queued(r: redis.Redis, queue: str = QUEUES["classify"]) -> int:
    return sum(int(r.llen(priority_list(queue, p))) for p in range(10))


def test_same_key_same_payload_returns_the_first_job(db_url: str, tmp_path: Path) -> None:
    with make_client(db_url, tmp_path) as client:
        first = client.submit(job(idempotency_key="order-1"))
        again = client.submit(job(idempotency_key="order-1", priority=9))  # another envelope, same work
        assert again.id == first.id
        assert queued(client.redis) == 1


def test_same_key_other_payload_is_a_conflict_and_sends_nothing(db_url: str, tmp_path: Path) -> None:
    with make_client(db_url, tmp_path) as client:
        first = client.submit(job(idempotency_key="order-2"))
        with pytest.raises(IdempotencyConflict, match=f"idempotency_key 'order-2' already names job {first.id}"):
            client.submit(job("A different text.", idempotency_key="order-2"))
        assert queued(client.redis) == 1


def test_a_key_holding_a_bare_id_still_returns_its_job(db_url: str, tmp_path: Path) -> None:
    with make_client(db_url, tmp_path) as client:
        client.redis.set(IDEMPOTENCY_KEY_PREFIX + "old", "job-from-an-older-producer")
        assert client.submit(job(idempotency_key="old")).id == "job-from-an-older-producer"
        assert queued(client.redis) == 0


def test_explicit_id_twice_is_refused(db_url: str, tmp_path: Path) -> None:
    with make_client(db_url, tmp_path) as client:
        client.submit(job(id="invoice-7"))
        with pytest.raises(DuplicateJob, match="job id 'invoice-7' was already submitted"):
            client.submit(job(id="invoice-7"))
        assert queued(client.redis) == 1
        assert 0 < int(client.redis.ttl(JOB_ID_KEY_PREFIX + "invoice-7")) <= client.settings.result_ttl_s
        # a generated id claims nothing but is recorded, so exists() knows it while it is queued
        generated = client.submit(job())
        assert len(list(client.redis.scan_iter(JOB_ID_KEY_PREFIX + "*"))) == 2 and generated.exists()


def test_a_refused_batch_sends_nothing_and_releases_its_claims(db_url: str, tmp_path: Path) -> None:
    with make_client(db_url, tmp_path) as client:
        client.submit(job(id="taken"))
        batch = [job(id="fresh-1"), job(idempotency_key="k-1"), job(id="taken")]
        with pytest.raises(DuplicateJob):
            client.submit_many(batch)
        assert queued(client.redis) == 1
        assert client.redis.get(JOB_ID_KEY_PREFIX + "fresh-1") is None
        assert client.redis.get(IDEMPOTENCY_KEY_PREFIX + "k-1") is None
        handles = client.submit_many(batch[:2])  # the same jobs, minus the duplicate, go through
        assert [h.id for h in handles] == [batch[0].id, batch[1].id] and queued(client.redis) == 3
        stored = client.redis.get(IDEMPOTENCY_KEY_PREFIX + "k-1")
        assert isinstance(stored, bytes) and stored.decode() == f"{batch[1].id}:{payload_hash(batch[1])}"


def test_a_queue_over_its_bound_refuses_new_jobs(db_url: str, tmp_path: Path) -> None:
    with make_client(db_url, tmp_path, max_queue_depth=5) as client:
        client.submit_many([job() for _ in range(4)])
        with pytest.raises(QueueFull, match=r"queue conveyor.classify holds 4 jobs, at most 5 allowed"):
            client.submit_many([job(), job()])
        client.submit(job())  # exactly at the bound
        with pytest.raises(QueueFull):  # counted from this producer's own sends, within the cache time
            client.submit(job(priority=9))
        assert queued(client.redis) == 5
        # Another producer's sends are seen once the cached depth is older than ~100 ms.
        client.redis.delete(*[priority_list(QUEUES["classify"], p) for p in range(10)])
        time.sleep(0.15)
        client.submit(job())
        assert queued(client.redis) == 1


def test_unbounded_when_zero(db_url: str, tmp_path: Path) -> None:
    with make_client(db_url, tmp_path, max_queue_depth=0) as client:
        client.submit_many([job() for _ in range(3)])
        assert queued(client.redis) == 3


def test_cli_reports_a_refusal_without_a_traceback(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from producers.cli import app

    monkeypatch.setenv("CONVEYOR_REDIS_URL", db_url)
    monkeypatch.setenv("CONVEYOR_HOME", str(tmp_path))
    spec = tmp_path / "job.json"
    spec.write_text('{"type": "classify", "id": "cli-1", "texts": ["a"], "labels": ["x", "y"]}')
    runner = CliRunner()
    first = runner.invoke(app, ["submit", "json", str(spec)])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, ["submit", "json", str(spec)])
    assert again.exit_code == 4 and "DuplicateJob: job id 'cli-1' was already submitted" in again.output
    assert "Traceback" not in again.output
