"""Waiting on many jobs at once (``Client.wait_all``, ``Client.as_completed``) through the result
backend's pub/sub: Celery's Redis backend PUBLISHes every record it writes on a channel named
like its key (``celery-task-meta-ID``; Conveyor's result writer does the same). One subscriber
connection serves every handle of a call, whatever their number:

0. read every record (pipelined GETs): jobs already finished need no subscription;
1. SUBSCRIBE to each other job's channel and wait for Redis to confirm: from then on, a record
   written is a message to us;
2. read those records once more: jobs that finished between (0) and (1) are found here;
3. take messages as they come; re-read the still pending records every ``RECHECK_S``, so a
   message lost while the subscriber reconnected costs a second, not the whole timeout.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from producers.sdk.outcomes import Meta, decode, is_ready, outcome
from shared.errors import JobFailed

if TYPE_CHECKING:
    from producers.client import Client, JobHandle

RECHECK_S = 1.0
CHUNK = 1000  # channels per SUBSCRIBE and keys per pipeline: bounded commands for any number of handles


def _chunks(items: Sequence[bytes]) -> Iterator[Sequence[bytes]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]


class JobsNotFinished(TimeoutError):
    """Time ran out with jobs unfinished: ``pending`` names them; ``unknown``, those of the first
    ``UNKNOWN_CHECKS`` that Conveyor has no record of (never submitted, or their results expired),
    so a mistyped or stale id says so instead of looking slow."""

    def __init__(self, pending: Sequence[str], total: int, timeout: float | None, unknown: Sequence[str] = ()) -> None:
        self.pending, self.total, self.timeout, self.unknown = list(pending), total, timeout, list(unknown)
        message = f"{len(self.pending)} of {total} jobs not finished within {timeout or 0:g}s ({_sample(self.pending)})"
        if self.unknown:
            message += f"; unknown to Conveyor (never submitted, or expired): {_sample(self.unknown)}"
        super().__init__(message)

    def with_unknown(self, unknown: Sequence[str]) -> JobsNotFinished:
        return JobsNotFinished(self.pending, self.total, self.timeout, unknown)


UNKNOWN_CHECKS = 10  # ids asked about at a timeout: two GETs each, only then


def _sample(ids: Sequence[str]) -> str:
    return ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")


def not_finished(left: int, total: int, timeout: float | None, ids: Sequence[str]) -> JobsNotFinished:
    return JobsNotFinished(list(ids), total, timeout)


def ready_records(client: Client, ids: Sequence[str], timeout: float | None) -> Iterator[tuple[str, Meta]]:
    """(id, record) for each job as it finishes, each id once; TimeoutError when ``timeout``
    seconds pass with some unfinished (None: no limit)."""
    backend = client.app.backend
    pending: dict[bytes, str] = {bytes(backend.get_key_for_task(i)): i for i in dict.fromkeys(ids)}
    total = len(pending)
    end = None if timeout is None else time.monotonic() + timeout

    def left() -> float:
        if end is None:
            return RECHECK_S
        remaining = end - time.monotonic()
        if remaining <= 0:
            raise not_finished(len(pending), total, timeout, list(pending.values()))
        return min(remaining, RECHECK_S)

    def reread() -> list[tuple[bytes, Meta]]:
        found = []
        for chunk in _chunks(list(pending)):
            pipe = client.redis.pipeline(transaction=False)
            for key in chunk:
                pipe.get(key)  # GETs, not MGET: a tenant's producer role grants GET (producers/tenancy/roles.py)
            for key, raw in zip(chunk, pipe.execute()):
                if raw is not None and is_ready(meta := decode(backend, raw)):
                    found.append((key, meta))
        return found

    for key, meta in reread():  # finished before the call: found without a subscription
        yield pending.pop(key), meta
    if not pending:
        return
    left()  # a timeout of 0 (or one spent meanwhile): what was found, then TimeoutError
    pubsub = client.redis.pubsub()
    try:
        watched = list(pending)
        for chunk in _chunks(watched):
            pubsub.subscribe(*chunk)
        messages: list[dict[str, Any]] = []
        confirmed = 0
        while confirmed < len(watched):
            message = pubsub.get_message(timeout=left())
            if message is not None and message["type"] == "subscribe":
                confirmed += 1
            elif message is not None and message["type"] == "message":
                messages.append(message)
        found = reread()
        last_read = time.monotonic()
        while pending:
            for message in messages:
                if message["channel"] in pending and is_ready(meta := decode(backend, message["data"])):
                    found.append((message["channel"], meta))
            messages = []
            for key, meta in found:
                if key in pending:
                    yield pending.pop(key), meta
            found = []
            if not pending:
                return
            message = pubsub.get_message(timeout=left())
            if message is not None and message["type"] == "message":
                messages.append(message)
            if time.monotonic() - last_read >= RECHECK_S:
                found, last_read = reread(), time.monotonic()
    finally:
        pubsub.close()  # drops the connection, and with it every subscription


def as_completed(client: Client, handles: Sequence[JobHandle], timeout: float | None) -> Iterator[JobHandle]:
    by_id: dict[str, list[JobHandle]] = {}
    for handle in handles:
        by_id.setdefault(handle.id, []).append(handle)
    try:
        for job_id, meta in ready_records(client, list(by_id), timeout):
            for handle in by_id[job_id]:
                handle._ready = meta  # its result() answers without asking Redis again
                yield handle
    except JobsNotFinished as late:
        raise late.with_unknown([i for i in late.pending[:UNKNOWN_CHECKS] if not client.exists(i)]) from None


def wait_all(
    client: Client, handles: Sequence[JobHandle], timeout: float | None, return_exceptions: bool
) -> list[BaseModel | JobFailed]:
    for _ in as_completed(client, handles, timeout):
        pass
    return collected(handles, return_exceptions)


def collected(handles: Sequence[Any], return_exceptions: bool) -> list[BaseModel | JobFailed]:
    """Finished handles' typed results, in order (sync and async handles alike); the first
    failure raises unless ``return_exceptions``."""
    outcomes: list[BaseModel | JobFailed] = []
    for handle in handles:
        assert handle._ready is not None
        result = outcome(handle.id, handle.type, handle._ready)
        if isinstance(result, JobFailed) and not return_exceptions:
            raise result
        outcomes.append(result)
    return outcomes
