"""Redis ACL roles (producers/tenancy/roles.py) against a real Redis: each role's allowed commands
work and everything else is refused with NOPERM; a producer of tenant A cannot read, cancel or
overwrite tenant B's job or result, nor touch the dead letters, kombu's unacked hash or the config;
workers run whole jobs, and Flower and the exporter run, with their own roles only, leaving
Redis's ACL LOG without a single refusal of theirs."""

from __future__ import annotations

import base64
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import ROOT, WorkerProcess

from producers.client import Client
from producers.local_redis import LocalRedis, free_port
from producers.tenancy.metrics import TenantCollector
from producers.tenancy.roles import role_rules
from producers.tenancy.users import create_user, server_major, user_url
from shared.celery_config import celery_priority
from shared.jobs import ClassifyJob
from shared.names import DEAD_LETTER_KEY, TASKS
from shared.supervisor import ChildSpec, spawn

Users = dict[str, str]  # name -> redis:// URL


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("acl-redis")
    local = LocalRedis(home, record_url=False)
    url = local.start()
    yield url
    local.stop()


@pytest.fixture(scope="module")
def users(server: str) -> Users:
    admin = redis.Redis.from_url(server)
    made = {}
    for name, role, tenant in (
        ("w", "worker", None),
        ("m", "monitor", None),
        ("a", "admin", None),
        ("acme", "producer", "acme"),
        ("beta", "producer", "beta"),
    ):
        made[name] = user_url(server, name, create_user(admin, name, role, tenant))
    admin.close()
    return made


def as_user(users: Users, name: str) -> redis.Redis:
    return redis.Redis.from_url(users[name], socket_timeout=10)


def refused(call: Callable[[], Any]) -> bool:
    """Whether Redis refuses ``call`` for want of permission (NOPERM; inside a script, its own words)."""
    try:
        call()
    except redis.exceptions.NoPermissionError:
        return True
    except redis.ResponseError as exc:
        if "can't run this command" in str(exc) or "no permissions" in str(exc):
            return True
        if "DEBUG command not allowed" in str(exc):  # Redis 7 refuses DEBUG to everybody by default
            return True
        raise
    return False


def listen(users: Users, name: str, command: str, channel: str) -> Callable[[], Any]:
    """SUBSCRIBE or PSUBSCRIBE on a connection of its own, the reply read at once."""
    return lambda: as_user(users, name).execute_command(command, channel)


def acl_log(server: str) -> list[dict[str, Any]]:
    entries = redis.Redis.from_url(server, decode_responses=True).acl_log(count=1000)
    return [dict(e) for e in entries]


# -- each role, command by command -------------------------------------------------------------------
def test_the_producer_role_publishes_and_reads_only_its_own(users: Users, server: str) -> None:
    acme = as_user(users, "acme")
    assert acme.lpush("conveyor.classify\x06\x164", b"{}") == 1 and acme.llen("conveyor.classify\x06\x164") == 1
    assert acme.set("conveyor:claim:acme:1", "digest", ex=60) and acme.getdel("conveyor:claim:acme:1") == b"digest"
    assert acme.set("conveyor:idempotency:acme:k", "v", nx=True, ex=60)
    assert acme.get("celery-task-meta-acme:1") is None
    assert acme.hmget("conveyor:quota:acme", ["max_queued"]) == [None]
    # CONVEYOR_WAIT_REPLICAS: the marker, then WAIT (no replicas here: answered at once).
    assert acme.set("conveyor:replicated", "1") and acme.execute_command("WAIT", 0, 10) == 0
    waiting = acme.pubsub()  # waiting for its result, as Celery's result backend does
    waiting.subscribe("celery-task-meta-acme:1")
    assert waiting.get_message(timeout=5)["type"] == "subscribe"
    waiting.close()
    if (
        server_major(redis.Redis.from_url(server)) >= 7
    ):  # selectors: the shared queue lists take LPUSH and LLEN, nothing else
        assert refused(lambda: acme.set("conveyor.classify", "x")) and refused(lambda: acme.delete("conveyor.classify"))
        assert refused(lambda: acme.expire("conveyor.classify", 1))
    for name, call in {
        "KEYS": lambda: acme.keys("*"),
        "SCAN": lambda: acme.scan(0),
        "FLUSHALL": lambda: acme.flushall(),
        "FLUSHDB": lambda: acme.flushdb(),
        "CONFIG GET": lambda: acme.config_get("*"),
        "CONFIG SET": lambda: acme.config_set("maxmemory", "1"),
        "EVAL": lambda: acme.eval("return 1", 0),
        "ACL SETUSER": lambda: acme.acl_setuser("x"),
        "SHUTDOWN": lambda: acme.execute_command("SHUTDOWN", "NOSAVE"),
        "DEBUG": lambda: acme.execute_command("DEBUG", "SLEEP", "0"),
        "MONITOR": lambda: acme.execute_command("MONITOR"),
        "CLIENT KILL": lambda: acme.execute_command("CLIENT", "KILL", "127.0.0.1:1"),
        "the dead letters": lambda: acme.hgetall(DEAD_LETTER_KEY),
        "the dead letters' order": lambda: acme.zrange("conveyor:dlq:order", 0, -1),
        "kombu's unacked hash": lambda: acme.hgetall("unacked"),
        "rewriting unacked": lambda: acme.hset("unacked", "tag", "x"),
        "the unacked index": lambda: acme.zadd("unacked_index", {"tag": 1}),
        "reading a queue": lambda: acme.lrange("conveyor.classify", 0, -1),
        "taking from a queue": lambda: acme.rpop("conveyor.classify"),
        "a worker's direct queue": lambda: acme.lpush("conveyor.direct.cpu@host", b"{}"),
        "worker control": lambda: acme.publish("/0.celery.pidbox", "shutdown"),
        "the event stream": listen(users, "acme", "PSUBSCRIBE", "/0.celeryev/*"),
        "another tenant's result": lambda: acme.get("celery-task-meta-beta:1"),
        "overwriting it": lambda: acme.set("celery-task-meta-beta:1", "{}"),
        "waiting on it": listen(users, "acme", "SUBSCRIBE", "celery-task-meta-beta:1"),
        "its claims": lambda: acme.set("conveyor:claim:beta:1", "x"),
        "its cancel flags": lambda: acme.set("conveyor:cancel:beta:1", "x"),
        "its idempotency keys": lambda: acme.get("conveyor:idempotency:beta:k"),
        "its quotas": lambda: acme.hmget("conveyor:quota:beta", ["max_queued"]),
        "an untenanted result": lambda: acme.get("celery-task-meta-plain-id"),
        "the workers' metrics": lambda: acme.hincrby("conveyor:metrics:jobs", "classify|SUCCESS", 1),
    }.items():
        assert refused(call), f"a producer of tenant acme may not use {name}"


def test_the_worker_role_has_no_admin_commands(users: Users) -> None:
    worker = as_user(users, "w")
    assert worker.set("celery-task-meta-x", "{}", ex=60) and worker.hset("unacked", "t", "x") == 1
    assert worker.hdel("unacked", "t") == 1 and worker.hlen(DEAD_LETTER_KEY) == 0
    assert worker.lpush("conveyor:wake-probe:cpu@host", b"x") == 1 and worker.delete("conveyor:wake-probe:cpu@host")
    assert worker.execute_command("WAIT", 0, 10) == 0  # after its result writes, with CONVEYOR_WAIT_REPLICAS
    keyspace = worker.pubsub()  # the idle wake-up listens for pushes to its queues
    keyspace.subscribe("__keyspace@0__:conveyor.classify")
    assert keyspace.get_message(timeout=5)["type"] == "subscribe"
    keyspace.close()
    assert worker.eval("return redis.call('LLEN', KEYS[1])", 1, "conveyor.classify") == 0  # its pop script's way
    for name, call in {
        "KEYS": lambda: worker.keys("*"),
        "FLUSHALL": lambda: worker.flushall(),
        "FLUSHDB": lambda: worker.flushdb(),
        "CONFIG SET": lambda: worker.config_set("maxmemory", "1"),
        "ACL": lambda: worker.acl_list(),
        "SHUTDOWN": lambda: worker.execute_command("SHUTDOWN", "NOSAVE"),
        "DEBUG": lambda: worker.execute_command("DEBUG", "SLEEP", "0"),
        "MONITOR": lambda: worker.execute_command("MONITOR"),
        "CLIENT KILL": lambda: worker.execute_command("CLIENT", "KILL", "127.0.0.1:1"),
        "a script's own FLUSHALL": lambda: worker.eval("return redis.call('FLUSHALL')", 0),
        "keys outside Conveyor's": lambda: worker.set("someone-else", "x"),
        "the gateway's API keys": lambda: worker.hgetall("conveyor:gateway:keys"),
    }.items():
        assert refused(call), f"a worker may not use {name}"


def test_the_monitor_role_only_reads(users: Users) -> None:
    monitor = as_user(users, "m")
    assert monitor.llen("conveyor.classify") == 0 and monitor.hlen(DEAD_LETTER_KEY) == 0
    assert monitor.hgetall("conveyor:metrics:jobs") == {} and monitor.get("celery-task-meta-acme:1") is None
    redis.Redis.from_url(users["a"]).sadd("conveyor:tenants", "acme")
    assert [m.name for m in TenantCollector(monitor).collect()][0] == "conveyor_tenant_queued_jobs"
    for name, call in {
        "LPUSH": lambda: monitor.lpush("conveyor.classify", b"{}"),
        "RPOP": lambda: monitor.rpop("conveyor.classify"),
        "SET": lambda: monitor.set("celery-task-meta-x", "{}"),
        "DEL": lambda: monitor.delete(DEAD_LETTER_KEY),
        "HSET": lambda: monitor.hset(DEAD_LETTER_KEY, "x", "{}"),
        "HDEL": lambda: monitor.hdel("unacked", "x"),
        "reading unacked": lambda: monitor.hgetall("unacked"),
        "worker control": lambda: monitor.publish("/0.celery.pidbox", "shutdown"),
        "FLUSHALL": lambda: monitor.flushall(),
        "CONFIG GET": lambda: monitor.config_get("*"),
        "KEYS": lambda: monitor.keys("*"),
        "a script's own write": lambda: monitor.eval("return redis.call('SET', KEYS[1], 1)", 1, "conveyor:dlq"),
    }.items():
        assert refused(call), f"the monitor may not use {name}"


def test_the_admin_role_runs_the_cli_but_not_the_server(users: Users) -> None:
    admin = as_user(users, "a")
    assert admin.hlen(DEAD_LETTER_KEY) == 0 and admin.set("conveyor:cancel:some-job", "x", ex=60)
    assert admin.zrevrange("conveyor:dlq:order", 0, 9) == []
    for name, call in {
        "FLUSHALL": lambda: admin.flushall(),
        "CONFIG SET": lambda: admin.config_set("maxmemory", "1"),
        "KEYS": lambda: admin.keys("*"),
        "ACL SETUSER": lambda: admin.acl_setuser("x"),
        "SHUTDOWN": lambda: admin.execute_command("SHUTDOWN", "NOSAVE"),
        "DEBUG": lambda: admin.execute_command("DEBUG", "SLEEP", "0"),
    }.items():
        assert refused(call), f"the admin role may not use {name}"


def test_compose_gives_its_services_these_roles(users: Users, server: str) -> None:
    """compose.yaml's Redis users carry roles.py's rules, which a real Redis accepts as they are."""
    import yaml

    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    redis_env = compose["redis"]["environment"]
    superuser = redis.Redis.from_url(server)
    for role in ("worker", "monitor"):
        rules = redis_env[f"{role.upper()}_ACL"]
        assert rules == " ".join(role_rules(role).acl_args(newer=()))  # a config any Redis version reads
        superuser.execute_command("ACL", "SETUSER", f"compose-{role}", "reset", "on", ">pw", *rules.split())
    assert compose["worker"]["environment"]["CONVEYOR_REDIS_URL"].startswith("redis://conveyor-worker:")
    assert compose["flower"]["environment"]["CONVEYOR_REDIS_URL"].startswith("redis://conveyor-monitor:")
    assert "user conveyor-worker reset on >%s %s" in " ".join(compose["redis"]["command"])


def test_the_users_command(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from producers.cli import app

    monkeypatch.setenv("CONVEYOR_REDIS_URL", server)  # a login allowed ACL SETUSER
    run = CliRunner().invoke
    added = run(app, ["users", "add", "team-z", "--role", "producer", "--tenant", "team-z"])
    assert added.exit_code == 0, added.output
    made = json.loads(added.output)
    assert made["env"].endswith("CONVEYOR_TENANT=team-z") and redis.Redis.from_url(made["redis_url"]).ping()
    listed = json.loads(run(app, ["users", "list"]).output)
    rules = next(u["rules"] for u in listed if u["user"] == "team-z")
    assert "~celery-task-meta-team-z:*" in rules and "#" not in rules  # no password hash shown
    assert "~celery-task-meta-team-z:*" in run(app, ["users", "rules", "producer", "--tenant", "team-z"]).output
    bad = run(app, ["users", "add", "x", "--role", "root"])
    assert bad.exit_code == 2 and "unknown role 'root'" in bad.output
    bad = run(app, ["users", "add", "default", "--role", "admin"])
    assert bad.exit_code == 2 and "not 'default'" in bad.output
    redis.Redis.from_url(server).zadd("conveyor:quota:team-z:queued", {"team-z:lost": 1})  # a purged queue's count
    assert json.loads(run(app, ["users", "quota", "team-z"]).output)["queued"] == 1
    shown = json.loads(run(app, ["users", "quota", "team-z", "--reset-queued", "--max-queued", "7"]).output)
    assert (shown["queued"], shown["max_queued"]) == (0, 7)
    assert json.loads(run(app, ["users", "remove", "team-z"]).output)["removed"] is True
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(made["redis_url"]).ping()


# -- real processes with their roles ----------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(
    server: str, users: Users, conveyor_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """A worker (worker role), Flower and the exporter (monitor role), each its own process."""
    logs = tmp_path_factory.mktemp("acl-logs")
    redis.Redis.from_url(server).acl_log_reset()
    worker = WorkerProcess(
        {**conveyor_env, "CONVEYOR_REDIS_URL": users["w"], "CONVEYOR_MAX_BATCH_SIZE": "8"},
        logs / "worker.log",
        ["--only", "inference"],
    )
    flower_port, metrics_port = free_port(), free_port()
    monitor_env = {**conveyor_env, "CONVEYOR_REDIS_URL": users["m"], "CONVEYOR_METRICS_AUTH": "false"}
    flower = spawn(
        ChildSpec(
            "flower",
            [sys.executable, "-m", "producers.flower_secure", "-A", "producers.flower_app", "flower",
             "--address=127.0.0.1", f"--port={flower_port}", "--persistent=False"],
            env={**monitor_env, "FLOWER_BASIC_AUTH": "boss:pw1,viewer:pw2", "CONVEYOR_FLOWER_READ_ONLY_USERS": "viewer",
                 "CONVEYOR_FLOWER_WATCH_ONLY": "1"},
            cwd=ROOT, log=logs / "flower.log",
        )
    )  # fmt: skip
    exporter = spawn(
        ChildSpec(
            "exporter",
            [sys.executable, "-m", "producers.tenancy.monitor_process", "producers.exporter",
             "--port", str(metrics_port)],
            env=monitor_env, cwd=ROOT, log=logs / "exporter.log",
        )
    )  # fmt: skip
    watcher = Client(redis_url=server)  # the superuser, only to wait for the worker's reply
    try:
        watcher.wait_for_workers(240, ["conveyor.classify"])
    except TimeoutError:
        pytest.fail("worker did not start:\n" + worker.tail())
    yield {
        "flower": f"http://127.0.0.1:{flower_port}",
        "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
        "logs": logs,
        "worker": worker,
    }
    watcher.close()
    for child in (flower, exporter):
        child.stop(15)
    worker.stop()


def http(url: str, login: tuple[str, str] | None = None, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if login:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(login).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_http(url: str, login: tuple[str, str] | None, timeout: float = 90.0) -> tuple[int, bytes]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return http(url, login)
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def dead_letter_for(client: redis.Redis, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """The dead letter of the message that carried ``job_id`` (waits for the worker to write it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for raw in client.hvals(DEAD_LETTER_KEY):
            letter = json.loads(raw)
            if job_id in str(letter.get("reason", "")):
                return dict(letter)
        time.sleep(0.2)
    raise AssertionError(f"no dead letter for {job_id}: {client.hvals(DEAD_LETTER_KEY)!r:.2000}")


def forged_message(job: ClassifyJob) -> bytes:
    """A Celery message for ``job`` as any Celery client would publish it (kombu's JSON)."""
    from celery import Celery

    app = Celery("forger", broker="memory://", set_as_current=False)
    app.conf.update(task_serializer="json")
    captured: list[Any] = []
    with app.connection_for_write() as conn:
        producer = app.amqp.Producer(conn)
        producer.publish = lambda body, **kw: captured.append((body, kw))
        app.send_task(TASKS["classify"], args=[job.model_dump(mode="json")], task_id=job.id, producer=producer)
    body, kw = captured[0]
    headers = kw["headers"]
    return json.dumps({
        "body": base64.b64encode(json.dumps(body).encode()).decode(), "content-encoding": "utf-8",
        "content-type": "application/json", "headers": headers,
        "properties": {"correlation_id": job.id, "delivery_mode": 2, "delivery_tag": job.id.replace(":", "-"),
                       "body_encoding": "base64", "priority": celery_priority(5),
                       "delivery_info": {"exchange": "", "routing_key": "conveyor.classify"}},
    }).encode()  # fmt: skip


@pytest.mark.slow
def test_tenants_and_roles_with_real_processes(server: str, users: Users, stack: dict[str, Any]) -> None:
    acme = Client(redis_url=users["acme"], tenant="acme")
    beta = Client(redis_url=users["beta"], tenant="beta")
    try:
        # A whole job, every part with its own role: producer, worker, results.
        handle = acme.submit(ClassifyJob(texts=["the match ended two nil"], labels=["sports", "finance"]))
        assert handle.id.startswith("acme:")
        first = handle.result_json(timeout=120)
        assert first["results"][0]["labels"][0]["label"] == "sports"

        # Tenant beta cannot read, wait on, cancel or overwrite acme's job.
        assert refused(lambda: beta.job(handle.id).status())
        with pytest.raises(ValueError, match="not tenant 'beta'"):
            beta.cancel(handle.id)
        assert refused(lambda: beta.redis.set("conveyor:cancel:" + handle.id, "x"))
        assert refused(lambda: beta.redis.set("celery-task-meta-" + handle.id, "{}"))
        with pytest.raises(ValueError, match="belongs to tenant 'acme'"):
            beta.submit(ClassifyJob(id=handle.id, texts=["x"], labels=["a", "b"]))

        # beta publishes, bypassing its SDK, a job under acme's prefix: the worker refuses it, as it
        # has no claim (only acme's user can write one): dead-lettered with the reason, no result.
        superuser = redis.Redis.from_url(server)
        forged = ClassifyJob(id="acme:forged-1", texts=["stocks fell"], labels=["sports", "finance"])
        beta.redis.lpush("conveyor.classify\x06\x164", forged_message(forged))
        assert dead_letter_for(superuser, forged.id)["reason"].startswith("job 'acme:forged-1' carries tenant 'acme'")
        assert superuser.get("celery-task-meta-" + forged.id) is None
        # The same forgery under acme's own finished job's id: acme's result is not rewritten.
        again = ClassifyJob(id=handle.id, texts=["stocks fell"], labels=["sports", "finance"])
        beta.redis.lpush("conveyor.classify\x06\x164", forged_message(again))
        assert "does not match its submit claim" in dead_letter_for(superuser, handle.id)["reason"]
        assert acme.job(handle.id).result_json(timeout=5) == first
        # A job of acme's still queued keeps its place when a forgery under its id is refused.
        superuser.set("conveyor:claim:acme:queued-1", "0" * 64, ex=60)  # as if acme had claimed another payload
        replay = ClassifyJob(id="acme:queued-1", texts=["x"], labels=["a", "b"])
        beta.redis.lpush("conveyor.classify\x06\x164", forged_message(replay))
        assert "does not match its submit claim" in dead_letter_for(superuser, replay.id)["reason"]
        assert superuser.get("celery-task-meta-" + replay.id) is None

        # Flower and the exporter answer with the monitor role; Flower's read-only login controls nothing.
        flower = stack["flower"]
        for page in ("/", "/tasks", "/workers", f"/task/{handle.id}", "/api/workers", "/api/queues/length",
                     f"/api/task/result/{handle.id}"):  # fmt: skip
            status, body = wait_http(flower + page, ("viewer", "pw2"))
            assert status == 200, (page, status, body[:300])
        assert http(flower + f"/api/task/revoke/{handle.id}", ("viewer", "pw2"), "POST")[0] == 403
        assert http(flower + "/api/task/async-apply/conveyor.classify", ("viewer", "pw2"), "POST")[0] == 403
        assert http(flower + "/", ("viewer", "wrong"))[0] == 401
        wanted = b'conveyor_jobs_total{job_type="classify",state="SUCCESS"}'
        deadline = time.monotonic() + 30  # the worker adds its counts to Redis every second
        while wanted not in (body := wait_http(stack["metrics"], None)[1]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert wanted in body, body.decode()[-3000:]
        time.sleep(3)  # a few more ticks of every loop: Flower's, the exporter's, the worker's
        # Not one refusal of the worker, Flower or the exporter in Redis's own log of them.
        # (The worker launcher's CONFIG GET of notify-keyspace-events is refused by design: it then
        # reads the workers' probe instead, and the embedded Redis has the setting in its config.)
        theirs = [
            e
            for e in acl_log(server)
            if e.get("username") in ("w", "m") and not str(e.get("object")).startswith("config")
        ]
        assert not theirs, json.dumps(theirs, indent=1)[:3000]
    finally:
        acme.close()
        beta.close()


@pytest.mark.slow
def test_a_training_job_runs_with_the_worker_role(
    server: str, users: Users, conveyor_env: dict[str, str], tmp_path: Path
) -> None:
    """Celery's own task path (the training intake hands the job to Celery's worker) under the worker role."""
    from shared.jobs import TrainJob

    interactions = tmp_path / "interactions.csv"
    rows = [f"u{u},i{(u * 7 + k) % 23}" for u in range(30) for k in range(4)]
    interactions.write_text("user,item\n" + "\n".join(rows) + "\n")
    redis.Redis.from_url(server).acl_log_reset()
    worker = WorkerProcess(
        {**conveyor_env, "CONVEYOR_REDIS_URL": users["w"]}, tmp_path / "train.log", ["--only", "training"]
    )
    acme = Client(redis_url=users["acme"], tenant="acme")
    try:
        handle = acme.submit(TrainJob(interactions_path=str(interactions), output_name="acl-als", model_type="als"))
        assert handle.id.startswith("acme:")
        result = handle.result_json(timeout=240)
        assert result["type"] == "train", result
        theirs = [
            e for e in acl_log(server) if e.get("username") == "w" and not str(e.get("object")).startswith("config")
        ]
        assert not theirs, [(e["reason"], e["object"], e["context"]) for e in theirs]
    except Exception:
        print(worker.tail())
        raise
    finally:
        acme.close()
        worker.stop()
