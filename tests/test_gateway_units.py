"""The gateway's parts one by one: API keys against a real Redis, the rate limiter, the callback
allow-list, webhook signatures, and `conveyor up`'s gateway child."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from conftest import empty_db

from producers.gateway.keys import KEY_PREFIX, KEYS_KEY, KeyStore
from producers.gateway.ratelimit import RateLimiter
from producers.gateway.webhooks import check_callback_url, sign, verify
from shared.settings import Settings

DB = 10


@pytest.fixture
def store(redis_url: str) -> Iterator[KeyStore]:
    for url in empty_db(redis_url, DB):
        client = redis.Redis.from_url(url)
        yield KeyStore(client)
        client.close()


def test_keys_are_stored_hashed_scoped_and_revocable(store: KeyStore) -> None:
    key = store.add("ci", "team-a", types=["ner", "classify"], rate_per_s=5)
    assert key.startswith(KEY_PREFIX) and len(key) >= 4 + 43  # 32 random bytes, base64url
    raw: dict[bytes, bytes] = store.redis.hgetall(KEYS_KEY)  # type: ignore[assignment]
    assert list(raw) == [hashlib.sha256(key.encode()).hexdigest().encode()]
    assert key.encode() not in b"".join(raw.values())  # never the key itself
    found = store.lookup(key)
    assert found is not None and found.tenant == "team-a" and found.types == ["classify", "ner"]
    assert found.may_submit("ner") and not found.may_submit("sentiment") and found.rate_per_s == 5
    assert store.lookup(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert store.lookup("not-a-key") is None and store.cached("x" * 10_000) == (True, None)
    assert [k.name for k in store.list()] == ["ci"]
    with pytest.raises(ValueError, match="exists"):
        store.add("ci", "team-a")
    with pytest.raises(ValueError, match="tenant"):
        store.add("other", "Team A")
    with pytest.raises(ValueError, match="unknown job type"):
        store.add("other", "team-a", types=["nope"])
    assert store.revoke("ci") and not store.revoke("ci")
    assert KeyStore(store.redis).lookup(key) is None and store.list() == []


def test_rate_limiter_allows_the_burst_then_the_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    limiter = RateLimiter()
    assert [limiter.take("k", 2.0, 3) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("k", 2.0, 3) == pytest.approx(0.5)  # one token in half a second
    assert limiter.take("other", 2.0, 3) == 0.0  # each key its own bucket
    now[0] += 0.5
    assert limiter.take("k", 2.0, 3) == 0.0 and limiter.take("k", 2.0, 3) > 0
    now[0] += 100  # refills to the burst, no further
    assert [limiter.take("k", 2.0, 3) for _ in range(4)][-1] > 0


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://hooks.example.com/x", True),
        ("https://HOOKS.example.com:443/x?a=1", True),
        ("http://127.0.0.1:9000/x", True),  # "127.0.0.1:9000" is listed
        ("http://127.0.0.1:9001/x", False),
        ("http://hooks.example.com.evil.net/x", False),
        ("http://evil.net/?hooks.example.com", False),
        ("http://hooks.example.com@evil.net/x", False),
        ("http://user:pw@hooks.example.com/x", False),
        ("file:///etc/passwd", False),
        ("gopher://hooks.example.com/x", False),
        ("http://hooks.example.com:notaport/x", False),
        ("http://[::1]/x", False),
        ("http://hooks.example.com/" + "a" * 3000, False),
    ],
)
def test_callback_urls_go_only_to_allowed_hosts(url: str, allowed: bool) -> None:
    hosts = Settings(gateway_webhook_hosts="hooks.example.com,127.0.0.1:9000").gateway_webhook_hosts  # type: ignore[arg-type]
    if allowed:
        assert check_callback_url(url, hosts) == url
    else:
        with pytest.raises(ValueError, match="callback_url"):
            check_callback_url(url, hosts)
    with pytest.raises(ValueError, match="webhooks are off"):
        check_callback_url("http://hooks.example.com/x", [])


def test_signatures_bind_the_body_the_secret_and_the_time() -> None:
    body = b'{"id": "a:1", "state": "SUCCESS"}'
    header = sign("s3cret", int(time.time()), body)
    assert verify("s3cret", header, body)
    assert not verify("s3cret", header, body.replace(b"SUCCESS", b"FAILURE"))
    assert not verify("other", header, body)
    assert not verify("s3cret", sign("s3cret", int(time.time()) - 3600, body), body)  # too old: a replay
    assert not verify("s3cret", "garbage", body) and not verify("s3cret", "t=1,v1=", body)


def test_conveyor_up_runs_the_gateway_as_a_supervised_child(tmp_path: Path, redis_url: str) -> None:
    from producers.stack import Stack

    settings = Settings(home=tmp_path, redis_url=redis_url)
    stack = Stack(settings)
    try:
        stack._start_gateway({"CONVEYOR_REDIS_URL": redis_url, "CONVEYOR_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
        assert stack.gateway_url is not None and stack.gateway_url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{stack.gateway_url}healthz").json() == {"ok": True}
        assert httpx.get(f"{stack.gateway_url}v1/jobs/a:1").status_code == 401
        child = stack.supervisor.child("gateway")
        assert child.spec.restart and child.alive()
    finally:
        stack.supervisor.stop()
    assert not child.alive()


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["gateway", "--help"], "CONVEYOR_GATEWAY_PORT"),
        (["keys", "--help"], "revoke"),
        (["keys", "add", "--help"], "--tenant"),
    ],
)
def test_the_gateway_commands_have_help(args: list[str], shown: str) -> None:
    from typer.testing import CliRunner

    from producers.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and shown in result.output, result.output
