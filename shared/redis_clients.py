"""One redis-py client per kombu channel, instead of one per Redis command.

kombu's Redis transport builds a fresh ``redis.Redis`` for every publish, ack and event
flush (``Channel.conn_or_acquire``). With redis-py 6+ each construction rebuilds a
~170-entry response-callback table, about 250 us of CPU (redis-py issue #3624): several
per job, on both the producer and the worker side. A client over a connection pool is
thread-safe (each command checks out its own connection), so one per channel pool serves
every caller. The cache follows the pool: when kombu replaces the pool after a connection
error, the next call builds a client over the new one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_PATCHED = False


def reuse_redis_clients() -> None:
    """Patch kombu's Redis channel once per process; idempotent."""
    global _PATCHED
    if _PATCHED:
        return
    from kombu.transport import redis as kombu_redis

    @contextmanager
    def conn_or_acquire(self: Any, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool
        cached = self.__dict__.get("_conveyor_client")
        if cached is None or cached.connection_pool is not pool:
            cached = self._conveyor_client = self._create_client()
        yield cached

    kombu_redis.Channel.conn_or_acquire = conn_or_acquire  # type: ignore[method-assign]
    _PATCHED = True
