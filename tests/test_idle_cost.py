"""An idle worker costs Redis almost nothing, and a lone job still starts at once: counted by
Redis itself (INFO commandstats, which counts the commands a Lua script runs too), so the bound
holds on a loaded machine. Each test has a private Redis: they count commands and change config."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from conftest import ROOT

from producers.local_redis import LocalRedis
from shared.metrics_keys import FLUSHES_KEY
from shared.names import priority_list
from shared.supervisor import ChildSpec, spawn
from workers.wakeup import KeyspaceWakeup

IDLE_BOUND = 50  # Redis commands per second per idle worker (issue 17's goal)
OURS = ("info", "config|resetstat", "config|get", "config|set", "config")


@pytest.fixture()
def private_redis(tmp_path: Path) -> Iterator[str]:
    server = LocalRedis(tmp_path / "redis", record_url=False)
    url = server.start()
    yield url
    server.stop()


def commands(r: redis.Redis) -> dict[str, int]:
    stats: Any = r.info("commandstats")
    return {
        k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items() if k.removeprefix("cmdstat_") not in OURS
    }


def test_idle_workers_cost_redis_almost_nothing_and_a_push_wakes_them(
    private_redis: str, conveyor_env: dict[str, str], tmp_path: Path
) -> None:
    env = dict(
        conveyor_env, CONVEYOR_REDIS_URL=private_redis, CONVEYOR_INSTANCES_PER_DEVICE="2", CONVEYOR_WAKEUP="notify"
    )
    argv = [sys.executable, "-m", "workers.launch", "--devices", "cpu", "--only", "inference", "--exit-with-parent"]
    log = tmp_path / "workers.log"
    child = spawn(ChildSpec("workers", argv, env=env, cwd=ROOT, log=log, stop_timeout=60))
    r = redis.Redis.from_url(private_redis)
    try:
        deadline = time.monotonic() + 300
        while int(r.hlen(FLUSHES_KEY)) < 2:  # both processes flush metrics once their loops run
            assert time.monotonic() < deadline, "workers did not come up:\n" + log.read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(3.0)  # start-up writes settle
        r.config_resetstat()
        window = 4.0
        time.sleep(window)
        idle = commands(r)
        per_worker_s = sum(idle.values()) / window / 2
        assert per_worker_s <= IDLE_BOUND, f"{per_worker_s:.0f} commands/s per idle worker: {idle}"
        assert idle.get("rpop", 0) == 0, f"an idle look popped list by list: {idle}"

        # Any Celery client's publish wakes them: a job sent by name finishes at once.
        app = Celery("plain", broker=private_redis, backend=private_redis)
        app.conf.update(task_serializer="json", accept_content=["json"], result_accept_content=["json"])
        started = time.monotonic()
        res = app.send_task("conveyor.classify", args=[{"texts": ["a lone job"], "labels": ["a", "b"]}],
                            queue="conveyor.classify")  # fmt: skip
        out = res.get(timeout=60)
        assert out["results"][0]["labels"][0]["label"] in ("a", "b")
        assert time.monotonic() - started < 30
    finally:
        child.stop(60)


def test_without_keyspace_notifications_the_worker_polls_and_rearms_when_they_return(private_redis: str) -> None:
    r = redis.Redis.from_url(private_redis)
    r.config_set("notify-keyspace-events", "")
    key = priority_list("conveyor.classify", 4)
    wake = KeyspaceWakeup(redis.Redis.from_url(private_redis), [key], "probe@test", probe_every_unarmed_s=0.5).start()
    try:
        time.sleep(3.0)  # the first probe goes unheard
        assert not wake.armed
        r.config_set("notify-keyspace-events", "Kl")
        deadline = time.monotonic() + 10
        while not wake.armed:
            assert time.monotonic() < deadline, "the wake-up did not notice notifications were turned on"
            time.sleep(0.1)
        wake.clear()
        r.lpush(key, "x")
        assert wake.wait(5.0), "a push to a served list did not wake the loop"
        wake.clear()
        r.rpop(key)  # pops wake nobody
        assert not wake.wait(0.5)
    finally:
        wake.stop()


def test_a_lost_subscription_is_renewed_and_looks_at_once(private_redis: str) -> None:
    """Redis drops the listener (CLIENT KILL, as at a failover): the wake-up reconnects, re-arms,
    and wakes the loop at once, since a push may have come while nobody listened."""
    r = redis.Redis.from_url(private_redis)
    key = priority_list("conveyor.classify", 4)
    wake = KeyspaceWakeup(redis.Redis.from_url(private_redis), [key], "kill@test").start()
    try:
        deadline = time.monotonic() + 10
        while not wake.armed:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        wake.clear()
        r.client_kill_filter(_type="pubsub")
        assert wake.wait(5.0), "a lost subscription did not wake the loop"
        deadline = time.monotonic() + 10
        while not (wake.armed and int(r.pubsub_numsub(f"__keyspace@0__:{key}")[0][1]) == 1):
            assert time.monotonic() < deadline, "the subscription was not renewed"
            time.sleep(0.05)
        wake.clear()
        r.lpush(key, "x")
        assert wake.wait(5.0)
    finally:
        wake.stop()


def test_conveyor_worker_turns_notifications_on_where_config_is_allowed(private_redis: str) -> None:
    from shared.keyspace_events import ensure_keyspace_events, missing_flags

    r = redis.Redis.from_url(private_redis)
    r.config_set("notify-keyspace-events", "Ex")
    assert "set to" in ensure_keyspace_events(r)
    assert missing_flags(str(r.config_get("notify-keyspace-events")["notify-keyspace-events"])) == ""
    assert missing_flags("AK") == "" and missing_flags("") == "Kl" and missing_flags("lE") == "K"
