"""Tenants: the SDK stamps a tenant's prefix, quotas refuse excess at submit (QuotaExceeded with a
retry_after_s, nothing queued), the submit claim binds a job to its payload, and `conveyor up` hands
each process only its own Redis user while `conveyor users add` makes a tenant's producer."""

from __future__ import annotations

import base64
import json
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producers.client import Client
from producers.local_redis import LocalRedis
from producers.tenancy.gate import TenantGate
from shared.errors import QuotaExceeded
from shared.jobs import ClassifyJob
from shared.names import priority_list
from shared.settings import Settings
from shared.tenant_keys import claim_key, job_digest, queued_key, quota_key
from workers.tenancy import claim_refusal


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = LocalRedis(tmp_path_factory.mktemp("tenants-redis"), record_url=False)
    yield server.start()
    server.stop()


@pytest.fixture
def db(url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield client
    client.close()


def job(**fields: Any) -> ClassifyJob:
    return ClassifyJob(texts=["a text"], labels=["x", "y"], **fields)


def queued(db: redis.Redis) -> int:
    return int(db.llen(priority_list("conveyor.classify", 4)))


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_the_sdk_stamps_the_tenant_on_ids_and_keys(url: str, db: redis.Redis) -> None:
    client = Client(redis_url=url, tenant="acme")
    handles = client.submit_many([job(), job(id="mine-1"), job(idempotency_key="k")])
    assert [h.id.startswith("acme:") for h in handles] == [True, True, True] and handles[1].id == "acme:mine-1"
    assert db.get("conveyor:idempotency:acme:k") is not None  # under the tenant's ACL pattern
    for _ in handles:  # each with its claim, holding the digest of what was sent
        raw = db.rpop(priority_list("conveyor.classify", 4))
        assert isinstance(raw, bytes)
        body = json.loads(base64.b64decode(json.loads(raw)["body"]))
        assert db.get(claim_key(body[0][0]["id"])) == job_digest(body[0][0]).encode()
    assert db.zcard(queued_key("acme")) == 3
    with pytest.raises(ValueError, match="belongs to tenant 'beta'"):
        client.submit(job(id="beta:theirs"))
    with pytest.raises(ValueError, match="is not tenant 'acme'"):
        client.cancel("beta:theirs")
    with pytest.raises(ValueError, match="bulk scoring finds lost chunks"):
        client.score("classify", "in.csv", "out.csv", "text", labels=["x", "y"])
    client.close()
    with pytest.raises(ValueError, match="tenant name"):
        TenantGate(lambda: db, "Not A Tenant", Settings())


def test_jobs_per_second_over_the_quota_are_refused_and_nothing_is_queued(url: str, db: redis.Redis) -> None:
    db.hset(quota_key("acme"), "max_jobs_per_s", 3)
    clock = Clock(1_000_000.25)
    gate = TenantGate(lambda: db, "acme", Settings(), clock=clock)
    first = [gate.stamp(job()) for _ in range(3)]
    gate.admit(first)
    extra = gate.stamp(job())
    with pytest.raises(QuotaExceeded, match="quota of 3 jobs a second") as refused:
        gate.admit([extra])
    assert refused.value.retry_after_s == pytest.approx(0.75) and refused.value.tenant == "acme"
    assert db.get(claim_key(extra.id)) is None and db.zcard(queued_key("acme")) == 3  # taken back
    clock.now += refused.value.retry_after_s  # the next second: room again
    gate.admit([extra])
    assert db.zcard(queued_key("acme")) == 4
    with pytest.raises(QuotaExceeded, match="submit fewer at a time"):
        gate.admit([gate.stamp(job()) for _ in range(4)])
    restored = pickle.loads(pickle.dumps(refused.value))
    assert (str(restored), restored.retry_after_s) == (str(refused.value), refused.value.retry_after_s)


def test_queued_jobs_over_the_quota_are_refused_until_workers_take_some(url: str, db: redis.Redis) -> None:
    db.hset(quota_key("acme"), mapping={"max_queued": 2, "max_jobs_per_s": 100})
    client = Client(redis_url=url, tenant="acme")
    sent = client.submit_many([job(), job()])
    before = queued(db)
    with pytest.raises(QuotaExceeded, match="has 2 jobs queued, at most 2") as refused:
        client.submit(job(idempotency_key="later"))
    assert refused.value.retry_after_s > 0 and queued(db) == before  # nothing sent
    assert db.get("conveyor:idempotency:acme:later") is None  # and its key released for the retry
    # A worker takes one (its claim check removes it from the tenant's queued jobs): room for one more.
    taken = sent[0]
    data = ClassifyJob(id=taken.id, texts=["a text"], labels=["x", "y"]).model_dump(mode="json")
    data["submitted_at"] = None  # another payload than the claimed one
    assert "does not match its submit claim" in str(claim_refusal(db, taken.id, data))
    assert db.zcard(queued_key("acme")) == 1
    client.submit(job(idempotency_key="later"))
    client.close()


def test_per_tenant_metrics_count_queued_and_refused_jobs(url: str, db: redis.Redis) -> None:
    from prometheus_client import CollectorRegistry

    from producers.tenancy.metrics import TenantCollector
    from shared.tenant_keys import TENANTS_KEY

    db.sadd(TENANTS_KEY, "acme", "idle", "Not A Tenant")  # a name that is no tenant is never a label
    db.hset(quota_key("acme"), mapping={"max_queued": 2, "max_jobs_per_s": 100})
    gate = TenantGate(lambda: db, "acme", Settings(), clock=Clock(7.5))
    gate.admit([gate.stamp(job()), gate.stamp(job())])
    with pytest.raises(QuotaExceeded):
        gate.admit([gate.stamp(job()) for _ in range(2)])
    registry = CollectorRegistry()
    registry.register(TenantCollector(db))
    sample = registry.get_sample_value
    assert sample("conveyor_tenant_queued_jobs", {"tenant": "acme"}) == 2
    assert sample("conveyor_tenant_quota_refused_total", {"tenant": "acme"}) == 2
    assert sample("conveyor_tenant_quota_max_queued", {"tenant": "acme"}) == 2
    assert sample("conveyor_tenant_quota_max_jobs_per_s", {"tenant": "idle"}) == Settings().tenant_max_jobs_per_s
    assert sample("conveyor_tenant_queued_jobs", {"tenant": "Not A Tenant"}) is None


def test_the_default_quotas_come_from_the_settings(url: str, db: redis.Redis) -> None:
    gate = TenantGate(lambda: db, "acme", Settings(tenant_max_queued=1), clock=Clock(5.5))
    gate.admit([gate.stamp(job())])
    with pytest.raises(QuotaExceeded, match="at most 1 allowed"):
        gate.admit([gate.stamp(job())])


def test_a_worker_refuses_an_unclaimed_or_altered_tenant_job(db: redis.Redis) -> None:
    data = job(id="acme:j1").model_dump(mode="json")
    assert "no submit claim" in str(claim_refusal(db, "acme:j1", data))
    db.set(claim_key("acme:j1"), job_digest(data))
    assert claim_refusal(db, "acme:j1", data) is None
    assert "does not match" in str(claim_refusal(db, "acme:j1", {**data, "texts": ["other"]}))
    assert claim_refusal(db, "no-tenant-id", data) is None  # jobs without a tenant: no claim needed


def test_a_batch_of_claims_is_read_in_one_pipeline(db: redis.Redis) -> None:
    from workers.tenancy import claims_from, queue_claim_lookups

    good, forged = job(id="acme:b1").model_dump(mode="json"), job(id="acme:b2").model_dump(mode="json")
    db.set(claim_key("acme:b1"), job_digest(good))
    db.zadd(queued_key("acme"), {"acme:b1": 1, "acme:b2": 1})
    pipe = db.pipeline(transaction=False)
    ids = queue_claim_lookups(pipe, ["acme:b1", "plain", "acme:b2"])
    claims = claims_from(ids, pipe.execute())
    assert ids == ["acme:b1", "acme:b2"] and db.zcard(queued_key("acme")) == 0
    db.delete(claim_key("acme:b1"))  # read already: no second round trip
    assert claim_refusal(db, "acme:b1", good, claims) is None
    assert "no submit claim" in str(claim_refusal(db, "acme:b2", forged, claims))


def test_workers_may_require_a_tenant(db: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    from workers import tenancy

    monkeypatch.setenv("CONVEYOR_REQUIRE_TENANT", "true")
    tenancy.tenant_required.cache_clear()
    try:
        assert "carries no tenant prefix" in str(claim_refusal(db, "plain-id", job(id="plain-id").model_dump()))
    finally:
        monkeypatch.delenv("CONVEYOR_REQUIRE_TENANT")
        tenancy.tenant_required.cache_clear()
    assert claim_refusal(db, "plain-id", {}) is None


KEY_CHARS = st.characters(min_codepoint=33, max_codepoint=0x2FFF, blacklist_categories=["Cs"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    texts=st.lists(
        st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=40), min_size=1, max_size=4
    ),
    priority=st.integers(0, 9),
    key=st.none() | st.text(KEY_CHARS, min_size=1, max_size=20),
)
def test_the_digest_survives_the_wire(texts: list[str], priority: int, key: str | None) -> None:
    """What the producer hashes is what the worker hashes after kombu's JSON round trip."""
    try:
        sent = ClassifyJob(texts=texts, labels=["x", "y"], priority=priority, idempotency_key=key)
    except ValueError:
        return  # a job the schema refuses is never sent
    wire = json.loads(json.dumps([[sent.model_dump(mode="json")], {}, {}]))
    assert job_digest(wire[0][0]) == job_digest(sent.model_dump(mode="json"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(claim=st.binary(max_size=80), job_id=st.text(max_size=60))
def test_any_claim_but_the_digest_is_refused(db: redis.Redis, claim: bytes, job_id: str) -> None:
    """Whatever a claim holds (bytes that are not UTF-8 included) and whatever the id, the check answers
    with a reason or None, never an exception, and None only for the payload's own digest."""
    data = job().model_dump(mode="json")
    tenant_id = "acme:" + job_id.encode("utf-8", "replace").hex()[:40]
    db.set(claim_key(tenant_id), claim)
    answer = claim_refusal(db, tenant_id, data)
    assert (answer is None) == (claim == job_digest(data).encode())
    assert isinstance(claim_refusal(db, job_id, data), str | None)


@settings(max_examples=60, deadline=None)
@given(raw_id=st.text(max_size=220), key=st.none() | st.text(min_size=1, max_size=220))
def test_stamping_any_id_gives_the_prefix_or_a_clear_error(raw_id: str, key: str | None) -> None:
    gate = TenantGate(lambda: redis.Redis(), "acme", Settings())  # stamp() itself never calls Redis
    try:
        source = ClassifyJob(id=raw_id, texts=["t"], labels=["x", "y"], idempotency_key=key)
    except ValueError:
        return  # the schema refuses it before any tenant is involved
    try:
        stamped = gate.stamp(source)
    except ValueError as exc:
        assert "belongs to tenant" in str(exc) or "too long" in str(exc)
        return
    assert stamped.id.startswith("acme:") and (key is None or str(stamped.idempotency_key).startswith("acme:"))
    assert ClassifyJob.model_validate(stamped.model_dump()).id == stamped.id  # still a valid job


# -- `conveyor up` and `conveyor users` --------------------------------------------------------------
@pytest.mark.slow
def test_up_gives_each_process_its_own_user_and_users_add_makes_a_tenant(tmp_path: Path) -> None:
    pytest.importorskip("flower")
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("CONVEYOR_REDIS_URL", "CONVEYOR_TENANT")}
    env.update(CONVEYOR_HOME=str(home), CONVEYOR_MODEL_DIR=str(tmp_path / "m"))  # taken ports move aside

    def cli(*args: str, extra: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "producers.cli", *args], env={**env, **(extra or {})}, cwd=ROOT,
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    started = cli("up", "--detach", "--devices", "cpu")
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        password = (home / "redis.password").read_text().strip()
        port = int((home / "redis.url").read_text().strip().rsplit(":", 1)[1].split("/")[0])
        superuser = redis.Redis(port=port, password=password, decode_responses=True)
        assert "conveyor-admin" in (home / "redis.url").read_text()  # the CLI's login is the admin's
        added = cli("users", "add", "team-a", "--role", "producer", "--tenant", "team-a")
        assert added.returncode == 0, added.stderr
        team_url = json.loads(added.stdout)["redis_url"]
        assert team_url.startswith("redis://team-a:")
        team = {"CONVEYOR_REDIS_URL": team_url, "CONVEYOR_TENANT": "team-a"}
        deadline = time.monotonic() + 180
        while True:
            done = cli("submit", "classify", "--text", "Heavy snow is expected tonight", "--labels",
                       "weather,finance", "--wait", "--timeout", "60", extra=team)  # fmt: skip
            if done.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert '"label": "weather"' in done.stdout, done.stdout + done.stderr
        assert '"job_id": "team-a:' in done.stdout
        # The team's login cannot read the dead letters, nor another tenant's keys.
        dlq = cli("dlq", "list", extra=team)
        assert dlq.returncode != 0 and "NOPERM" in (dlq.stdout + dlq.stderr).upper().replace(" ", ""), dlq.stderr
        quota = cli("users", "quota", "team-a", "--max-jobs-per-s", "1")
        assert json.loads(quota.stdout)["max_jobs_per_s"] == 1
        # Each process logged in as its own role's user; none as the superuser.
        users = {c["user"] for c in superuser.client_list()} - {"default"}
        assert {"conveyor-worker", "conveyor-monitor"} <= users, users
        refusals = [e for e in superuser.acl_log(count=500) if str(e["username"]).startswith("conveyor-")]
        refusals = [
            e for e in refusals if not str(e["object"]).startswith("config")
        ]  # the launcher's look at notify-keyspace-events
        assert not refusals, [(e["username"], e["reason"], e["object"], e["context"]) for e in refusals]
        assert oct((home / "redis.users.json").stat().st_mode & 0o777) == "0o600"
    finally:
        stopped = cli("down", timeout=90)
        assert stopped.returncode == 0, stopped.stderr
