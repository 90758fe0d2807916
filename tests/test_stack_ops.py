"""Operating `conveyor up`: private files, no secret in `ps`, an embedded Redis that comes
back after a SIGKILL (same port, same data), Flower with Conveyor's results and queues on a
free port when its own is taken, no orphan after SIGINT + SIGKILL, and `conveyor down`
finding a Redis that a hard-killed `up` left behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import ROOT

from producers.local_redis import LocalRedis, free_port
from shared.supervisor import spawn

PASSWORD_FILES = ("redis.password", "flower.password")


def _ps() -> str:
    """Every process's command line, as any local user sees it."""
    return subprocess.run(["ps", "-eo", "pid,args", "ww"], capture_output=True, text=True, check=True).stdout


def _assert_private(home: Path) -> None:
    assert home.stat().st_mode & 0o777 == 0o700, oct(home.stat().st_mode)
    for path in home.rglob("*"):
        mode = path.stat().st_mode & 0o777
        assert mode & 0o077 == 0, f"{path} is {oct(mode)}: readable by others"


def _wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _leftovers(home: Path) -> list[str]:
    """Processes still tied to ``home``: by command line or, for redis-server (which rewrites
    its command line), by working directory."""
    found = [line for line in _ps().splitlines() if str(home) in line]
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if Path(f"/proc/{pid}/cwd").resolve().is_relative_to(home):
                    found.append(f"{pid} (cwd in {home})")
            except OSError:
                pass
    return found


def test_embedded_redis_keeps_its_secrets_and_files_private(tmp_path: Path) -> None:
    home = tmp_path / "home"
    server = LocalRedis(home)
    url = server.start()
    try:
        password = (home / "redis.password").read_text().strip()
        assert password and password not in _ps()  # the password is in a 0600 config file, not argv
        client = redis.Redis.from_url(url)
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        client.set("payload", "x")
        client.execute_command("BGREWRITEAOF")  # the AOF and log exist and stay 0600
        _wait_until(lambda: client.info("persistence")["aof_rewrite_in_progress"] == 0, 10, "the AOF rewrite")
        _assert_private(home)
    finally:
        server.stop()


def test_down_stops_a_redis_that_a_hard_killed_up_left_behind(tmp_path: Path) -> None:
    home = tmp_path / "home"
    orphan = LocalRedis(home)
    spec = orphan.spec()
    spec.die_with_parent = False  # as an `up` from before the parent-death signal, or on another OS
    child = spawn(spec)
    orphan.child = child
    orphan.wait_ready()
    env = {k: v for k, v in os.environ.items() if k != "CONVEYOR_REDIS_URL"}
    env["CONVEYOR_HOME"] = str(home)
    down = subprocess.run(
        [sys.executable, "-m", "producers.cli", "down"], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert down.returncode == 0, down.stderr
    assert f"redis-server (pid {child.pid})" in down.stdout
    child.process.wait(10)
    assert not (home / "redis.url").exists()
    again = subprocess.run(
        [sys.executable, "-m", "producers.cli", "down"], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert again.stdout.strip() == "nothing to stop"


def _get(url: str, auth: tuple[str, str]) -> tuple[int, Any]:
    request = urllib.request.Request(url)
    request.add_header("Authorization", "Basic " + b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status), json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None


@pytest.mark.slow
def test_up_detached_survives_a_redis_kill_keeps_secrets_and_leaves_no_orphans(tmp_path: Path) -> None:
    pytest.importorskip("flower")
    home = tmp_path / "home"
    taken = socket.socket()  # something else already listens on Flower's port
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy_port = taken.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "CONVEYOR_REDIS_URL"}
    env.update(
        CONVEYOR_HOME=str(home), CONVEYOR_FLOWER_PORT=str(busy_port), CONVEYOR_MODEL_DIR=str(tmp_path / "models"),
        CONVEYOR_DEVICES="cpu", CONVEYOR_METRICS_PORT=str(free_port()), CONVEYOR_FLOWER_PASSWORD="",
    )  # fmt: skip

    def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "producers.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip

    up_pid = 0
    try:
        started = cli("up", "--detach")
        assert started.returncode == 0, started.stdout + started.stderr
        up_pid = json.loads((home / "up.ready").read_text())["pid"]
        state = json.loads((home / "up.ready").read_text())
        flower = state["flower_url"]
        assert flower and f":{busy_port}/" not in flower  # moved off the taken port, and said where
        assert flower in started.stdout

        # No secret on any command line; every file of the home private.
        user, password = "conveyor", (home / "flower.password").read_text().strip()
        redis_password = (home / "redis.password").read_text().strip()
        ps = _ps()
        assert password not in ps and redis_password not in ps
        _assert_private(home)

        # Flower runs with Conveyor's configuration: results readable, Conveyor's queues listed.
        url = (home / "redis.url").read_text().strip()
        from celery import Celery

        from shared.celery_config import celery_config
        from shared.settings import Settings

        app = Celery("test-results", set_as_current=False)
        app.conf.update(celery_config(Settings(redis_url=url)))
        app.backend.store_result("flower-reads-this", {"answer": 42}, "SUCCESS")
        status, body = _get(f"{flower}api/task/result/flower-reads-this", (user, password))
        assert status == 200 and body["result"] == {"answer": 42}, (status, body)
        status, body = _get(f"{flower}api/queues/length", (user, password))
        assert status == 200 and "conveyor.classify" in {q["name"] for q in body["active_queues"]}, body

        # SIGKILL the embedded Redis: `up` starts it again, same port, same data (AOF).
        client = redis.Redis.from_url(url)
        client.set("survives", "the kill")
        first = int((home / "redis" / "redis.pid").read_text())
        os.kill(first, signal.SIGKILL)
        _wait_until(
            lambda: (home / "redis" / "redis.pid").exists()
            and (home / "redis" / "redis.pid").read_text().strip() not in ("", str(first))
            and _pings(client), 30, "redis-server to come back",
        )  # fmt: skip
        assert client.get("survives") == b"the kill"  # same URL (port, password), same data
        assert (home / "redis.url").read_text().strip() == url

        # A service manager's hard stop: SIGINT, then SIGKILL half a second later.
        os.kill(up_pid, signal.SIGINT)
        time.sleep(0.5)
        os.kill(up_pid, signal.SIGKILL)
        _wait_until(lambda: not _leftovers(home), 15, "every process of the home to stop")
    finally:
        taken.close()
        if up_pid:
            cli("down", timeout=60)
    down = cli("down", timeout=60)
    assert down.returncode == 0 and down.stdout.strip() == "nothing to stop", down.stdout
    assert not _leftovers(home)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def test_a_stale_pid_file_never_stops_another_process(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "redis").mkdir(parents=True)
    (home / "redis" / "redis.pid").write_text(str(os.getpid()))  # reused by an unrelated process: us
    assert LocalRedis(home).running_pid() is None
    assert LocalRedis(home).stop_orphan() is None  # and we are still here


def test_the_next_up_stops_an_orphaned_redis_before_starting_its_own(tmp_path: Path) -> None:
    home = tmp_path / "home"
    orphan = LocalRedis(home)
    spec = orphan.spec()
    spec.die_with_parent = False
    orphan.child = spawn(spec)
    orphan.wait_ready()
    successor = LocalRedis(home)  # what `conveyor up` does first in a home (Stack._start_redis)
    assert successor.running_pid() == orphan.child.pid
    assert successor.stop_orphan() == orphan.child.pid
    orphan.child.process.wait(10)
    url = successor.start()
    try:
        assert redis.Redis.from_url(url).ping()
    finally:
        successor.stop()
