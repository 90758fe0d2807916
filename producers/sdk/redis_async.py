"""An asyncio Redis client from a Conveyor URL, as ``shared.redis_connect.redis_client`` opens a
sync one: ``redis://``, ``rediss://``, ``unix://`` by URL, kombu's ``sentinel://`` form through
redis-py's asyncio Sentinel (the master of ``CONVEYOR_SENTINEL_MASTER``, asked again after a
failover). The URL parsing is redis_connect's own. A URL's client waits for a free connection
past ``MAX_CONNECTIONS``; the Sentinel pool (redis-py's) has no such bound."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel

from shared.redis_connect import is_sentinel, parse_sentinel_url, sentinel_kwargs
from shared.settings import Settings

# Connections one client opens at most; a command beyond waits (up to POOL_WAIT_S) for a free one
# instead of failing with MaxConnectionsError: a thousand concurrent waits are a thousand reads.
MAX_CONNECTIONS = 64
POOL_WAIT_S = 30.0


def async_redis_client(settings: Settings, url: str | None = None, **kwargs: Any) -> aioredis.Redis:
    url = url or settings.broker_url()
    if not is_sentinel(url):
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=POOL_WAIT_S, **kwargs
        )
        client: aioredis.Redis = aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it
        return client
    parsed = parse_sentinel_url(url)
    login = {k: v for k, v in (("password", parsed.password), ("username", parsed.username)) if v}
    sentinel = Sentinel(parsed.hosts, sentinel_kwargs=sentinel_kwargs(settings), **login, db=parsed.db, **kwargs)
    master: aioredis.Redis = sentinel.master_for(settings.sentinel_master)
    return master
