"""An asyncio Redis client from a Conveyor URL, as ``shared.redis_connect.redis_client`` opens a
sync one: ``redis://``, ``rediss://``, ``unix://`` by URL, kombu's ``sentinel://`` form through
redis-py's asyncio Sentinel (the master of ``CONVEYOR_SENTINEL_MASTER``, asked again after a
failover). The URL parsing is redis_connect's own."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel

from shared.redis_connect import is_sentinel, parse_sentinel_url, sentinel_kwargs
from shared.settings import Settings


def async_redis_client(settings: Settings, url: str | None = None, **kwargs: Any) -> aioredis.Redis:
    url = url or settings.broker_url()
    if not is_sentinel(url):
        client: aioredis.Redis = aioredis.Redis.from_url(url, **kwargs)
        return client
    parsed = parse_sentinel_url(url)
    login = {k: v for k, v in (("password", parsed.password), ("username", parsed.username)) if v}
    sentinel = Sentinel(parsed.hosts, sentinel_kwargs=sentinel_kwargs(settings), **login, db=parsed.db, **kwargs)
    master: aioredis.Redis = sentinel.master_for(settings.sentinel_master)
    return master
