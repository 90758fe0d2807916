"""The asyncio SDK: ``AsyncClient`` and its ``AsyncJobHandle``s, on ``redis.asyncio``.

Waiting holds no thread: every wait of a client (``handle.result``, ``wait_all``, ``as_completed``)
is a future fed by one pub/sub connection subscribed to the jobs' result channels
(``celery-task-meta-ID``, which Celery's Redis backend and Conveyor's result writer PUBLISH every
record on), so a thousand concurrent waits cost one connection and no thread pool. The order
that misses nothing is ``producers.sdk.waiting``'s: read the records (a finished job needs no
subscription), subscribe to the others, await Redis's confirmation, read them again, then take
messages; pending records are re-read every ``RECHECK_S`` in case a
message was lost while the subscriber reconnected.

Submitting runs the sync client's path (validation, admission, claims, Celery's own
``send_task``, so the wire stays Celery's) as one short hop to a thread per call, whatever the
number of jobs; ``cancel``'s revoke broadcast too. Reads (``status``, ``exists``) are native.

    async with AsyncClient() as client:
        handles = await client.submit_many(jobs)
        results = await client.wait_all(handles, timeout=60)
        one = await handles[0].result(timeout=5)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import suppress
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel

from producers.client import Client, JobLike
from producers.sdk.outcomes import JobStatus, Meta, decode, is_ready, result_json, status_from_meta, typed
from producers.sdk.redis_async import async_redis_client
from producers.sdk.waiting import CHUNK, RECHECK_S, UNKNOWN_CHECKS, JobsNotFinished, collected, not_finished
from shared.errors import JobFailed
from shared.names import JOB_ID_KEY_PREFIX
from shared.settings import Settings
from shared.tenant_keys import claim_key

log = logging.getLogger(__name__)


class ResultListener:
    """One pub/sub connection that resolves futures as the records of the jobs they wait for
    become final. Subscriptions are counted per channel: the last waiter of a job unsubscribes."""

    def __init__(self, client: aioredis.Redis, backend: Any) -> None:
        self._redis = client
        self._backend = backend
        self._pubsub: Any = None
        self._waiters: dict[bytes, list[asyncio.Future[Meta]]] = {}
        self._subscribed: dict[bytes, asyncio.Event] = {}
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def key(self, job_id: str) -> bytes:
        return bytes(self._backend.get_key_for_task(job_id))

    async def ready(self, ids: Sequence[str], timeout: float | None) -> AsyncIterator[tuple[str, Meta]]:
        """(id, final record) for each job as it finishes, each id once; TimeoutError when
        ``timeout`` passes first. Deadlines are per await, never across a ``yield``."""
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        futures: dict[asyncio.Future[Meta], str] = {}
        for job_id in dict.fromkeys(ids):
            future: asyncio.Future[Meta] = loop.create_future()
            self._waiters.setdefault(self.key(job_id), []).append(future)
            futures[future] = job_id
        pending = set(futures)

        def left() -> float | None:
            if end is None:
                return None
            remaining = end - loop.time()
            if remaining <= 0:
                raise not_finished(len(pending), len(futures), timeout, [futures[f] for f in pending])
            return remaining

        try:
            await self._reread([self.key(i) for i in futures.values()])  # finished already: no subscription
            for future in [f for f in pending if f.done()]:
                pending.discard(future)
                yield futures[future], future.result()
            if pending:
                try:
                    await asyncio.wait_for(self._subscribe([self.key(futures[f]) for f in pending]), left())
                except TimeoutError:
                    raise not_finished(len(pending), len(futures), timeout, [futures[f] for f in pending]) from None
            while pending:
                done, pending = await asyncio.wait(pending, timeout=left(), return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    yield futures[future], future.result()
        finally:
            await self._forget(futures)

    async def _subscribe(self, keys: list[bytes]) -> None:
        async with self._lock:
            if self._pubsub is None:
                self._pubsub = self._redis.pubsub()
            new = [k for k in dict.fromkeys(keys) if k not in self._subscribed]
            for key in new:
                self._subscribed[key] = asyncio.Event()
            # Shielded: a waiter that times out mid-way must not leave a channel half subscribed
            # that later waiters of the same job would wait on.
            await asyncio.shield(self._send_subscribe(new))
        # Redis confirmed each subscription: from now every record written reaches us, so the
        # read below and the messages after it miss nothing.
        for key in keys:
            await self._subscribed[key].wait()
        await self._reread(keys)

    async def _send_subscribe(self, keys: list[bytes]) -> None:
        for start in range(0, len(keys), CHUNK):
            await self._pubsub.subscribe(*keys[start : start + CHUNK])
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read(), name="conveyor-result-listener")

    async def _reread(self, keys: Iterable[bytes]) -> None:
        keys = list(keys)
        for start in range(0, len(keys), CHUNK):
            chunk = keys[start : start + CHUNK]
            pipe = self._redis.pipeline(transaction=False)
            for key in chunk:
                pipe.get(key)  # as producers.sdk.waiting: GETs, which a tenant's role grants
            for key, raw in zip(chunk, await pipe.execute()):
                if raw is not None:
                    self._resolve(key, raw)

    def _resolve(self, key: bytes, raw: bytes | str) -> None:
        waiters = self._waiters.get(key)
        if not waiters or not is_ready(meta := decode(self._backend, raw)):
            return
        for future in waiters:
            if not future.done():
                future.set_result(meta)

    async def _forget(self, futures: dict[asyncio.Future[Meta], str]) -> None:
        gone: list[bytes] = []
        for future, job_id in futures.items():
            key = self.key(job_id)
            waiters = self._waiters.get(key, [])
            if future in waiters:
                waiters.remove(future)
            if not waiters and key in self._waiters:
                del self._waiters[key]
                self._subscribed.pop(key, None)
                gone.append(key)
        if gone and self._pubsub is not None:
            async with self._lock:
                gone = [key for key in gone if key not in self._waiters]  # not waited for again meanwhile
                with suppress(Exception):  # a dead connection dropped its subscriptions anyway
                    for start in range(0, len(gone), CHUNK):
                        await self._pubsub.unsubscribe(*gone[start : start + CHUNK])

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        last_read = loop.time()
        while self._waiters:
            try:
                message = await self._pubsub.get_message(timeout=RECHECK_S)
                if message is not None and message["type"] == "subscribe":
                    event = self._subscribed.get(message["channel"])
                    if event is not None:
                        event.set()
                elif message is not None and message["type"] == "message":
                    self._resolve(message["channel"], message["data"])
                if loop.time() - last_read >= RECHECK_S:
                    last_read = loop.time()
                    await self._reread(list(self._waiters))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: redis-py reconnects and resubscribes on the next read
                log.warning("result listener: %s: %s; retrying", type(exc).__name__, exc)
                await asyncio.sleep(0.5)
        self._reader = None

    async def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await reader
        if self._pubsub is not None:
            await self._pubsub.aclose()
            self._pubsub = None


class AsyncJobHandle:
    def __init__(self, client: AsyncClient, job_id: str, job_type: str | None = None) -> None:
        self.client = client
        self.id = job_id
        self.type = job_type
        self._ready: Meta | None = None

    def __repr__(self) -> str:
        return f"AsyncJobHandle(id={self.id!r}, type={self.type!r})"

    async def status(self) -> JobStatus:
        """PENDING both for a queued job and for an id nobody submitted: ``exists()`` tells them apart."""
        return await self.client.status(self.id)

    async def exists(self) -> bool:
        return await self.client.exists(self.id)

    async def result_json(self, timeout: float | None = None) -> dict[str, Any]:
        """The raw result object; raises JobFailed (the worker's error type and message), or
        TimeoutError when the job is not done within ``timeout`` seconds."""
        if self._ready is None:
            async for handle in self.client.as_completed([self], timeout):
                assert handle._ready is not None
        assert self._ready is not None
        return result_json(self.id, str(self._ready.get("status")), self._ready.get("result"))

    async def result(self, timeout: float | None = None) -> BaseModel:
        """The typed result (ClassifyResult, TranscribeResult, ...)."""
        return typed(await self.result_json(timeout), self.type, self.id)

    async def cancel(self) -> None:
        await self.client.cancel(self.id)


class AsyncClient:
    """The asyncio SDK. ``tenant`` as ``Client``'s: its jobs carry the tenant's prefix and claims."""

    def __init__(
        self, redis_url: str | None = None, settings: Settings | None = None, tenant: str | None = None
    ) -> None:
        self.sync = Client(redis_url, settings, tenant)
        self.settings = self.sync.settings
        self.redis: aioredis.Redis = async_redis_client(self.settings)
        self.listener = ResultListener(self.redis, self.sync.app.backend)

    # -- submitting ------------------------------------------------------------------------
    async def submit(self, job: JobLike, queue: str | None = None) -> AsyncJobHandle:
        return (await self.submit_many([job], queue=queue))[0]

    async def submit_many(self, jobs: Iterable[JobLike], queue: str | None = None) -> list[AsyncJobHandle]:
        """As ``Client.submit_many`` (every job validated first, one connection), off the loop."""
        sent = await asyncio.to_thread(self.sync.submit_many, list(jobs), queue)
        return [AsyncJobHandle(self, h.id, h.type) for h in sent]

    # -- following -------------------------------------------------------------------------
    def job(self, job_id: str) -> AsyncJobHandle:
        return AsyncJobHandle(self, job_id)

    async def status(self, job: str | AsyncJobHandle) -> JobStatus:
        job_id = job if isinstance(job, str) else job.id
        raw = await self.redis.get(self.listener.key(job_id))
        return status_from_meta(job_id, None if raw is None else decode(self.sync.app.backend, raw))

    async def exists(self, job_id: str) -> bool:
        """As ``Client.exists``: a record in the result backend, or this SDK's submit record."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(JOB_ID_KEY_PREFIX + job_id)
        pipe.get(claim_key(job_id))
        if any(await pipe.execute()):
            return True
        return await self.redis.get(self.listener.key(job_id)) is not None

    async def result(self, handle: AsyncJobHandle, timeout: float | None = None) -> BaseModel:
        return await handle.result(timeout)

    async def as_completed(
        self, handles: Iterable[AsyncJobHandle], timeout: float | None = None
    ) -> AsyncIterator[AsyncJobHandle]:
        """The handles as their jobs finish (``await handle.result()`` then answers at once)."""
        by_id: dict[str, list[AsyncJobHandle]] = {}
        for handle in handles:
            by_id.setdefault(handle.id, []).append(handle)
        try:
            async for job_id, meta in self.listener.ready(list(by_id), timeout):
                for handle in by_id[job_id]:
                    handle._ready = meta
                    yield handle
        except JobsNotFinished as late:
            unknown = [i for i in late.pending[:UNKNOWN_CHECKS] if not await self.exists(i)]
            raise late.with_unknown(unknown) from None

    async def wait_all(
        self, handles: Iterable[AsyncJobHandle], timeout: float | None = None, *, return_exceptions: bool = False
    ) -> list[BaseModel | JobFailed]:
        """Every handle's typed result, in order; as ``Client.wait_all``."""
        handles = list(handles)
        async for _ in self.as_completed(handles, timeout):
            pass
        return collected(handles, return_exceptions)

    async def cancel(self, job_id: str) -> None:
        """``Client.cancel`` (the flag, and Celery's revoke broadcast), off the loop."""
        await asyncio.to_thread(self.sync.cancel, job_id)

    async def close(self) -> None:
        await self.listener.close()
        await self.redis.aclose()
        self.sync.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
