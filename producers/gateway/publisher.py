"""Submits of one tenant that arrive together are published together: while one ``submit_many``
runs in the thread pool, the jobs that come in meanwhile wait, and the next pass takes them all
(up to ``MAX_BATCH``) in one call, one thread hop and one round trip for the tenant's quota and
claims. A lone request goes at once (no timer: nothing waits for company), so batching costs
latency nothing and keeps the gateway's one process (one GIL) from spending itself on a thread
per request.

A refusal of the SDK (quota, full queue, idempotency, an invalid job) comes before anything of
the call is sent, so a refused batch is tried again job by job: each request gets its own answer,
and one job's refusal never refuses another. Any other error (Redis away) fails the batch's
requests alike, as it would fail one ``submit_many``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fastapi.concurrency import run_in_threadpool

from producers.client import Client, JobHandle
from shared.errors import ConveyorError
from shared.jobs import JobBase

MAX_BATCH = 256

_Waiting = tuple[JobBase, "asyncio.Future[JobHandle]"]


class Publisher:
    def __init__(self, client: Callable[[str], Client]) -> None:
        self._client = client  # tenant -> its SDK client
        self._waiting: dict[str, list[_Waiting]] = {}
        self._draining: dict[str, asyncio.Task[None]] = {}

    async def submit(self, tenant: str, job: JobBase) -> JobHandle:
        future: asyncio.Future[JobHandle] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(tenant, []).append((job, future))
        if tenant not in self._draining:
            self._draining[tenant] = asyncio.create_task(self._drain(tenant))
        return await future

    async def _drain(self, tenant: str) -> None:
        try:
            waiting = self._waiting[tenant]
            while waiting:
                batch = waiting[:MAX_BATCH]
                del waiting[:MAX_BATCH]
                await self._publish(tenant, batch)
        finally:
            del self._draining[tenant]

    async def _publish(self, tenant: str, batch: list[_Waiting]) -> None:
        client = self._client(tenant)
        try:
            handles = await run_in_threadpool(client.submit_many, [job for job, _ in batch])
        except (ConveyorError, ValueError) as exc:  # refused before anything was sent
            if len(batch) == 1:
                _settle(batch[0][1], exc)
                return
            for job, future in batch:
                try:
                    _settle(future, await run_in_threadpool(client.submit, job))
                except Exception as one:
                    _settle(future, one)
        except Exception as exc:
            for _, future in batch:
                _settle(future, exc)
        else:
            for (_, future), handle in zip(batch, handles):
                _settle(future, handle)


def _settle(future: asyncio.Future[JobHandle], outcome: JobHandle | BaseException) -> None:
    if future.done():  # its request went away (the client disconnected)
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
