"""The SDK over many handles: AsyncClient on redis.asyncio (waits are pub/sub futures, not
threads), Client.wait_all / as_completed, exists() for unknown ids. Real Redis; records written
by Celery's own result backend, or by a real worker running real jobs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from conftest import empty_db
from e2e_helpers import LABELS, TOPICAL
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from producers.client import AsyncClient as ReExported
from producers.client import Client, JobHandle
from producers.local_redis import LocalRedis
from producers.sdk.async_client import AsyncClient, AsyncJobHandle
from producers.sdk.waiting import JobsNotFinished
from producers.tenancy.users import create_user, user_url
from shared.celery_config import celery_config
from shared.errors import InvalidJob, JobFailed
from shared.jobs import ClassifyJob
from shared.results import ClassifyResult
from shared.settings import Settings

DB = 13


@pytest.fixture()
def url(redis_url: str) -> Iterator[str]:
    """A database of its own: jobs queued here are never taken by the session's workers."""
    yield from empty_db(redis_url, DB)


def backend(url: str) -> Any:
    """Celery's own Redis result backend: what a worker writes (SETEX and PUBLISH)."""
    app = Celery("writer", set_as_current=False)
    app.conf.update(celery_config(Settings(redis_url=url)))
    return app.backend


def ids(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


def test_async_client_is_the_one_producers_client_names() -> None:
    assert ReExported is AsyncClient


def test_twelve_concurrent_one_second_waits_take_one_second_without_threads(url: str) -> None:
    async def main() -> tuple[float, list[BaseException | Any], int]:
        async with AsyncClient(url) as client:
            handles = [client.job(i) for i in ids(200)]
            threads = threading.active_count()
            start = time.monotonic()
            outcomes = await asyncio.gather(*(h.result(timeout=1.0) for h in handles[:12]), return_exceptions=True)
            twelve = time.monotonic() - start
            start = time.monotonic()
            many = await asyncio.gather(*(h.result(timeout=1.0) for h in handles), return_exceptions=True)
            assert time.monotonic() - start < 1.8, "200 concurrent 1 s waits"
            assert all(isinstance(o, TimeoutError) for o in many)
            return twelve, outcomes, threading.active_count() - threads

    twelve, outcomes, new_threads = asyncio.run(main())
    assert all(isinstance(o, TimeoutError) for o in outcomes), outcomes
    assert "1 of 1 jobs not finished within 1s" in str(outcomes[0])
    assert 0.95 <= twelve < 1.5, f"12 concurrent 1 s waits took {twelve:.2f} s"
    assert new_threads <= 0, "waiting started threads"


def test_records_published_by_celerys_backend_resolve_waits_at_once(url: str) -> None:
    """Waiting jobs finish as Celery's backend writes their records: those written before the
    wait are read, those written during it arrive by pub/sub well inside the 1 s re-read."""
    writer = backend(url)
    early, late, failed = ids(3), ids(20), ids(1)
    for job_id in early:
        writer.store_result(job_id, {"job_id": job_id, "v": 0}, "SUCCESS")
    writer.store_result(late[0], {"job_id": late[0], "type": "classify", "results": "not a list"}, "STARTED")

    async def main() -> tuple[list[Any], list[float]]:
        async with AsyncClient(url) as client:
            handles = [client.job(i) for i in early + late + failed]
            latencies: list[float] = []

            async def write_later() -> None:
                await asyncio.sleep(0.3)
                for job_id in late:
                    written = time.monotonic()
                    await asyncio.to_thread(writer.store_result, job_id, {"job_id": job_id, "n": 1}, "SUCCESS")
                    done = await client.job(job_id).result_json(timeout=5)  # a second waiter, same job
                    latencies.append(time.monotonic() - written)
                    assert done == {"job_id": job_id, "n": 1}
                await asyncio.to_thread(writer.mark_as_failure, failed[0], InvalidJob("texts: too short"))

            writing = asyncio.create_task(write_later())
            order = [h.id async for h in client.as_completed(handles, timeout=20)]
            await writing
            results = await client.wait_all(handles, timeout=1, return_exceptions=True)
            again = await client.wait_all([client.job(h.id) for h in handles], timeout=0, return_exceptions=True)
            assert [type(r) for r in again] == [type(r) for r in results]
            assert set(order) == {h.id for h in handles} and set(order[:3]) == set(early)
            with pytest.raises(JobFailed) as raised:
                await client.wait_all(handles, timeout=1)
            assert raised.value.error_type == "InvalidJob" and raised.value.job_id == failed[0]
            return results, latencies

    results, latencies = asyncio.run(main())
    assert [r.model_dump() for r in results[:3]] == [{"job_id": i, "v": 0} for i in early]
    assert isinstance(results[-1], JobFailed) and "texts: too short" in results[-1].message
    assert max(latencies) < 0.5, f"pub/sub latency {max(latencies):.3f} s (the re-read is 1 s)"


def test_waits_that_come_and_go_on_one_job_leave_the_next_waiter_subscribed(url: str) -> None:
    """Subscriptions are counted per job: waiters that give up never unsubscribe a job another
    waiter still waits for (which would then hear only the 1 s re-read, not the message)."""
    writer = backend(url)

    async def main() -> list[float]:
        async with AsyncClient(url) as client:
            latencies = []
            for _ in range(5):
                handle = client.job(str(uuid.uuid4()))

                async def churn(h: AsyncJobHandle = handle) -> None:
                    for n in range(15):
                        with contextlib.suppress(TimeoutError):
                            await h.result_json(timeout=0.001 * (n % 7 + 1))

                await asyncio.gather(*(churn() for _ in range(8)), asyncio.sleep(0))
                waiter = asyncio.create_task(client.job(handle.id).result_json(timeout=5))
                await asyncio.gather(*(churn() for _ in range(4)))  # others come and go meanwhile
                await asyncio.sleep(0.1)
                written = time.monotonic()
                await asyncio.to_thread(writer.store_result, handle.id, {"job_id": handle.id}, "SUCCESS")
                await waiter
                latencies.append(time.monotonic() - written)
            return latencies

    latencies = asyncio.run(main())
    assert max(latencies) < 0.5, latencies


def test_sync_wait_all_and_as_completed_over_one_subscriber(url: str) -> None:
    writer = backend(url)
    client = Client(url)
    try:
        done_before, done_after = ids(50), ids(50)
        for job_id in done_before:
            writer.store_result(job_id, {"job_id": job_id, "type": "x", "v": 1}, "SUCCESS")
        handles = [client.job(i) for i in done_before + done_after]

        def write() -> None:
            time.sleep(0.3)
            for job_id in done_after:
                writer.store_result(job_id, {"job_id": job_id, "v": 2}, "SUCCESS")

        thread = threading.Thread(target=write)
        start = time.monotonic()
        thread.start()
        seen = [h.id for h in client.as_completed(handles, timeout=20)]
        took = time.monotonic() - start
        thread.join()
        assert sorted(seen) == sorted(h.id for h in handles) and set(seen[:50]) == set(done_before)
        assert took < 1.5, took
        results = client.wait_all(handles, timeout=5)
        assert [r.model_dump()["v"] for r in results if isinstance(r, BaseModel)] == [1] * 50 + [2] * 50
        assert handles[0].result_json(timeout=0.01)["v"] == 1  # answered from what as_completed read
        fresh = [client.job(h.id) for h in handles]  # finished jobs: read at once, no subscription
        subscribes = int(client.redis.info("commandstats").get("cmdstat_subscribe", {}).get("calls", 0))
        assert len(client.wait_all(fresh, timeout=0)) == 100
        assert int(client.redis.info("commandstats").get("cmdstat_subscribe", {}).get("calls", 0)) == subscribes

        unknown = client.job(str(uuid.uuid4()))
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"1 of 101 jobs not finished within 0\.5s"):
            client.wait_all([*handles, unknown], timeout=0.5)
        assert time.monotonic() - start < 1.2
    finally:
        client.close()


def test_exists_tells_a_queued_job_from_an_unknown_id_at_once(url: str) -> None:
    client = Client(url)
    try:
        queued = client.submit(ClassifyJob(texts=["Snow closed the roads."], labels=LABELS), queue="sdk-test-nobody")
        explicit = client.submit(ClassifyJob(id="my-own-id-1", texts=["x"], labels=LABELS), queue="sdk-test-nobody")
        unknown = client.job(str(uuid.uuid4()))
        assert queued.status().state == unknown.status().state == "PENDING"  # Celery cannot tell them apart
        start = time.monotonic()
        assert queued.exists() and explicit.exists() and not unknown.exists()
        assert time.monotonic() - start < 0.1
        with pytest.raises(JobsNotFinished) as late:  # a timeout names the ids nobody submitted
            client.wait_all([queued, unknown], timeout=0.3)
        assert late.value.pending == [queued.id, unknown.id] and late.value.unknown == [unknown.id]
        assert f"unknown to Conveyor (never submitted, or expired): {unknown.id}" in str(late.value)
        backend(url).store_result("finished-elsewhere", {"job_id": "finished-elsewhere"}, "SUCCESS")
        assert client.exists("finished-elsewhere")  # a job another Celery client sent, once it has a record

        async def main() -> tuple[bool, bool, str]:
            async with AsyncClient(url) as aclient:
                with pytest.raises(JobsNotFinished) as late:
                    await aclient.job(unknown.id).result(timeout=0.2)
                assert late.value.unknown == [unknown.id]
                with pytest.raises(JobsNotFinished) as late:
                    await aclient.wait_all([aclient.job(queued.id)], timeout=0.2)
                assert late.value.pending == [queued.id] and late.value.unknown == []
                return (
                    await aclient.job(queued.id).exists(),
                    await aclient.exists(unknown.id),
                    (await aclient.status(unknown.id)).state,
                )

        assert asyncio.run(main()) == (True, False, "PENDING")
    finally:
        client.close()


@pytest.mark.slow  # loads real weights or trains
def test_async_client_with_a_real_worker(conveyor_env: dict[str, str], worker: Any) -> None:
    """Real classify jobs through a real worker: submit_many gives async handles, results are
    typed, a job that fails at the worker (sent by a bare Celery client) is a JobFailed."""
    url = conveyor_env["CONVEYOR_REDIS_URL"]
    bare = Celery("bare", broker=url, backend=url)
    bare.conf.update(task_serializer="json")
    broken = bare.send_task("conveyor.classify", args=[{"texts": [], "labels": LABELS}], queue="conveyor.classify")

    async def main() -> None:
        async with AsyncClient() as client:
            jobs = [ClassifyJob(texts=[text], labels=LABELS) for text, _ in TOPICAL]
            handles = await client.submit_many(jobs)
            assert all(isinstance(h, AsyncJobHandle) for h in handles)
            first = await handles[0].result(timeout=120)
            assert isinstance(first, ClassifyResult) and first.results[0].labels[0].label == TOPICAL[0][1]
            results = await client.wait_all([*handles, client.job(broken.id)], timeout=120, return_exceptions=True)
            assert [r.results[0].labels[0].label for r in results[:-1]] == [t[1] for t in TOPICAL]  # type: ignore[union-attr]
            assert isinstance(results[-1], JobFailed) and results[-1].error_type == "InvalidJob"

    asyncio.run(main())
    sync = Client()
    try:
        handles = sync.submit_many([ClassifyJob(texts=[text], labels=LABELS) for text, _ in TOPICAL])
        finished: list[JobHandle] = list(sync.as_completed(handles, timeout=120))
        assert sorted(h.id for h in finished) == sorted(h.id for h in handles)
        labels = [
            r.results[0].labels[0].label for r in sync.wait_all(handles, timeout=5) if isinstance(r, ClassifyResult)
        ]
        assert labels == [t[1] for t in TOPICAL]
    finally:
        sync.close()


def test_a_tenants_sdk_waits_and_exists_within_its_redis_acl(tmp_path: Path) -> None:
    """A tenant's producer role grants GET and SUBSCRIBE on its own keys and channels, not MGET or
    EXISTS: wait_all, as_completed, exists and the async client work with that role alone."""
    local = LocalRedis(tmp_path, record_url=False)
    server = local.start()
    admin = redis.Redis.from_url(server)
    try:
        acme = user_url(server, "acme", create_user(admin, "acme", "producer", "acme"))
        writer = backend(server)
        client = Client(acme, tenant="acme")
        queued = client.submit(ClassifyJob(texts=["Snow closed the roads."], labels=LABELS))
        assert queued.id.startswith("acme:") and queued.exists() and not client.exists(f"acme:{uuid.uuid4()}")
        assert admin.get(f"conveyor:job:{queued.id}") is None, "a tenant's submit claim is its record"
        with pytest.raises(TimeoutError):
            client.wait_all([queued], timeout=0.3)
        writer.store_result(queued.id, {"job_id": queued.id, "type": "other", "v": 1}, "SUCCESS")
        assert [h.id for h in client.as_completed([queued], timeout=5)] == [queued.id]

        async def main() -> None:
            async with AsyncClient(acme, tenant="acme") as aclient:
                handle = await aclient.submit(ClassifyJob(texts=["A second one."], labels=LABELS))
                assert handle.id.startswith("acme:") and await handle.exists()
                assert not await aclient.exists(f"acme:{uuid.uuid4()}")
                waiting = asyncio.create_task(aclient.wait_all([handle, aclient.job(queued.id)], timeout=10))
                await asyncio.sleep(0.3)
                await asyncio.to_thread(
                    writer.store_result, handle.id, {"job_id": handle.id, "type": "other", "v": 2}, "SUCCESS"
                )
                results = await waiting
                assert [r.model_dump()["v"] for r in results if isinstance(r, BaseModel)] == [2, 1]
                assert (await aclient.status(handle.id)).state == "SUCCESS"

        asyncio.run(main())
        client.close()
        # CLIENT SETINFO, which redis-py sends on connecting and lets fail, is the role's only refusal
        denied = [e for e in admin.acl_log() if e.get("username") == "acme" and e.get("object") != "client"]
        assert not denied, denied
    finally:
        admin.close()
        local.stop()


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
_exception = st.fixed_dictionaries(
    {"exc_type": st.text(max_size=12) | st.sampled_from(["InvalidJob", "system", "ValueError"]),
     "exc_message": _json, "exc_module": st.sampled_from(["builtins", "os", "shared.errors", "no.such", ""])}
)  # fmt: skip
_record = st.fixed_dictionaries(
    {"status": st.sampled_from(["SUCCESS", "FAILURE", "REVOKED", "PROGRESS", "STARTED", "RETRY"]) | _json,
     "result": _json | _exception},
    optional={"type": st.sampled_from(["classify", "transcribe", "train"]) | _json, "task_id": _json},
).map(lambda r: json.dumps(r).encode())  # fmt: skip
HOSTILE_RECORDS = st.binary(max_size=64) | _record | _json.map(lambda v: json.dumps(v).encode())


@settings(max_examples=int(os.environ.get("CONVEYOR_FUZZ_EXAMPLES", "30")), deadline=None, database=None,
          suppress_health_check=list(HealthCheck))  # fmt: skip
@given(records=st.lists(HOSTILE_RECORDS, min_size=1, max_size=4))
def test_hostile_result_records_end_waits_visibly_and_never_break_the_listener(url: str, records: list[bytes]) -> None:
    """Whatever someone writes and publishes as a result record, waits end with a result, a
    JobFailed or a TimeoutError, status() answers, and the listener still serves the next job."""
    r = redis.Redis.from_url(url)
    sync = Client(url)
    keys = [f"celery-task-meta-{uuid.uuid4()}" for _ in records]
    ids = [k.removeprefix("celery-task-meta-") for k in keys]

    async def main() -> None:
        async with AsyncClient(url) as client:
            handles = [client.job(i) for i in ids]
            waiting = asyncio.create_task(client.wait_all(handles, timeout=0.3, return_exceptions=True))
            await asyncio.sleep(0.05)
            for key, raw in zip(keys, records):
                r.set(key, raw, ex=60)
                r.publish(key, raw)
            try:
                results = await waiting
                assert all(isinstance(o, BaseModel | JobFailed) for o in results), results
            except TimeoutError:
                pass
            for i in ids:
                await client.status(i)
            good = str(uuid.uuid4())
            later = asyncio.create_task(client.job(good).result_json(timeout=2))
            await asyncio.sleep(0.05)
            r.publish(f"celery-task-meta-{good}", json.dumps({"status": "SUCCESS", "result": {"ok": 1}}))
            assert await later == {"ok": 1}  # by pub/sub: nothing was SET

    try:
        asyncio.run(main())
        try:
            outcomes = sync.wait_all([sync.job(i) for i in ids], timeout=0.2, return_exceptions=True)
            assert all(isinstance(o, BaseModel | JobFailed) for o in outcomes), outcomes
        except TimeoutError:
            pass
        assert all(sync.job(i).status().state for i in ids)
    finally:
        sync.close()
        r.close()
