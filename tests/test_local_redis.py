"""The embedded Redis launcher: loopback only, password required, AOF on, URL recorded."""

from __future__ import annotations

from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from producers.local_redis import LocalRedis


def test_embedded_redis_is_private_durable_and_recorded(tmp_path: Path) -> None:
    server = LocalRedis(tmp_path)
    url = server.start()
    try:
        assert (tmp_path / "redis.url").read_text().strip() == url
        assert "@127.0.0.1:" in url
        authed = redis.Redis.from_url(url)
        assert authed.config_get("appendonly")["appendonly"] == "yes"
        assert authed.config_get("bind")["bind"] == "127.0.0.1"
        port = authed.connection_pool.connection_kwargs["port"]
        # No retries: redis-py counts a refused login as a connection error and retries it with back-off.
        anonymous = redis.Redis(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0))
        try:
            anonymous.ping()
            raise AssertionError("a client without the password was let in")
        except redis.AuthenticationError:
            pass
        except redis.ResponseError as exc:  # older servers say NOAUTH this way
            assert "NOAUTH" in str(exc) or "auth" in str(exc).lower()
        authed.set("survives", "restart")
    finally:
        server.stop()
    assert not (tmp_path / "redis.url").exists()
    again = LocalRedis(tmp_path)  # same home: same password, and the AOF brings the data back
    url2 = again.start()
    try:
        assert redis.Redis.from_url(url2).get("survives") == b"restart"
    finally:
        again.stop()
