"""One way to open a Redis client from a Conveyor URL, for every process that talks to Redis
directly (the ingest, result writer, lease keeper, DLQ, exporter, stats, the SDK's own reads).

Besides ``redis://``, ``rediss://`` and ``unix://``, the URL may be kombu's Sentinel form,
``sentinel://:PASSWORD@h1:26379;sentinel://:PASSWORD@h2:26379`` (optionally ``/DB`` on each
part): the client then asks the sentinels for the master of ``CONVEYOR_SENTINEL_MASTER`` and,
after a failover, for the new one. redis-py's ``SentinelConnectionPool`` does the asking on every
new connection and drops connections to a server that turned replica (``READONLY`` errors), so
Lua scripts always run on the master. Celery's broker (kombu's ``sentinel`` transport) and result
backend (``SentinelBackend``) read the same URL; ``celery_config`` hands them the master name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:  # redis is a dependency of every process, but keep ``shared`` light to import
    import redis

    from shared.settings import Settings

SENTINEL_SCHEME = "sentinel"
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelURL:
    """A parsed ``sentinel://`` URL: the sentinels' addresses and the master's login."""

    hosts: list[tuple[str, int]]
    password: str | None = None
    username: str | None = None
    db: int = 0
    options: dict[str, str] = field(default_factory=dict)


def is_sentinel(url: str) -> bool:
    return url.strip().lower().startswith(SENTINEL_SCHEME + "://")


def parse_sentinel_url(url: str) -> SentinelURL:
    """Split kombu's ``;``-joined Sentinel URL. The first part that names a login or a db
    gives it (kombu and Celery's backend read it the same way)."""
    hosts: list[tuple[str, int]] = []
    password = username = None
    db: int | None = None
    for chunk in (c.strip() for c in url.split(";")):
        if not chunk:
            continue
        parts = urlsplit(chunk)
        if parts.scheme.lower() != SENTINEL_SCHEME:
            raise ValueError(f"every part of a Sentinel URL starts with sentinel://, not {chunk.split(':', 1)[0]}://")
        if not parts.hostname:
            raise ValueError("a sentinel:// part names no host")
        hosts.append((parts.hostname, parts.port or DEFAULT_SENTINEL_PORT))
        if password is None and parts.password:
            password = unquote(parts.password)
        if username is None and parts.username:
            username = unquote(parts.username)
        path = parts.path.strip("/")
        if db is None and path:
            if not path.isdigit():
                raise ValueError(f"the database in a sentinel:// URL is a number, not {path!r}")
            db = int(path)
    if not hosts:
        raise ValueError("a sentinel:// URL names no sentinel")
    return SentinelURL(hosts=hosts, password=password, username=username, db=db or 0)


def sentinel_kwargs(settings: Settings) -> dict[str, Any]:
    """How to log in to the sentinels themselves (their own ``requirepass``), if they ask."""
    kwargs: dict[str, Any] = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0}
    if settings.sentinel_password:
        kwargs["password"] = settings.sentinel_password
    return kwargs


def redis_client(settings: Settings, url: str | None = None, **kwargs: Any) -> redis.Redis:
    """A client of the Redis that ``settings`` names (``url`` overrides it). ``kwargs`` go to
    every connection (``socket_timeout``, ``decode_responses``, ...)."""
    import redis as redis_lib

    url = url or settings.broker_url()
    if not is_sentinel(url):
        return redis_lib.Redis.from_url(url, **kwargs)
    from redis.sentinel import Sentinel

    parsed = parse_sentinel_url(url)
    login = {k: v for k, v in (("password", parsed.password), ("username", parsed.username)) if v}
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        parsed.hosts, sentinel_kwargs=sentinel_kwargs(settings), **login, db=parsed.db, **kwargs
    )
    client: redis.Redis = sentinel.master_for(settings.sentinel_master)  # type: ignore[no-untyped-call]
    return client
