"""`conveyor up`: the embedded Redis (unless CONVEYOR_REDIS_URL is set), the workers and
Flower, as supervised child processes (shared/supervisor.py): each is restarted if it dies
(Redis on the same port, with the same data), and all stop together, within seconds of Ctrl-C.
``--detach`` runs the same in the background; `conveyor down` stops it.

One `up` per CONVEYOR_HOME: its pid is recorded there. A redis-server left running by an
`up` that was killed hard is found through its pid file and stopped, by `down` or the next `up`.
Secrets never reach a command line: Redis reads its password from a 0600 config file, Flower
its login from the environment (FLOWER_BASIC_AUTH)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from producers.local_redis import LocalRedis, free_port, port_is_free, private_dir, write_private
from producers.tenancy.monitor_process import READ_ONLY_USERS_ENV, WATCH_ONLY_ENV
from shared.log_format import configure_logging, drain_pumps, rotating_file
from shared.settings import REDIS_URL_FILE, Settings
from shared.supervisor import Child, ChildSpec, Supervisor, open_private_log

PID_FILE = "up.pid"
READY_FILE = "up.ready"  # JSON written once everything answers: {"pid": ..., "flower_url": ...}
LOG_FILE = "up.log"  # a detached `up`'s own console
LOGS_DIR = "logs"  # one rotating file per process under CONVEYOR_HOME (or CONVEYOR_LOG_DIR)
# What keeps log files plain text: no tqdm bars, no colours, lines as they are written.
QUIET_OUTPUT_ENV = {"TQDM_DISABLE": "1", "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}
FLOWER_PASSWORD_FILE = "flower.password"
FLOWER_MONITOR_PASSWORD_FILE = "flower-monitor.password"
# Seconds each child gets between SIGTERM and SIGKILL when the stack stops (Ctrl-C, `down`).
# Workers stop warm (jobs in flight are put back and redelivered); Redis flushes its AOF.
STOP_TIMEOUT_S = 8.0


def flower_monitor_login(settings: Settings) -> tuple[str, str]:
    """Flower's read-only login: CONVEYOR_FLOWER_MONITOR_USER, its password generated once (0600)."""
    path = settings.home / FLOWER_MONITOR_PASSWORD_FILE
    if not path.exists():
        private_dir(settings.home)
        write_private(path, secrets.token_urlsafe(12))
    return settings.flower_monitor_user, path.read_text().strip()


def flower_login(settings: Settings) -> tuple[str, str]:
    if settings.flower_password:
        return settings.flower_user, settings.flower_password
    path = settings.home / FLOWER_PASSWORD_FILE
    if not path.exists():
        private_dir(settings.home)
        write_private(path, secrets.token_urlsafe(12))
    return settings.flower_user, path.read_text().strip()


@dataclass(frozen=True)
class UpState:
    """What a running `conveyor up` recorded about itself once it was ready."""

    pid: int
    flower_url: str | None
    metrics_url: str | None = None
    gateway_url: str | None = None


def read_state(settings: Settings) -> UpState | None:
    try:
        data = json.loads((settings.home / READY_FILE).read_text())
        return UpState(int(data["pid"]), data.get("flower_url"), data.get("metrics_url"), data.get("gateway_url"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def flower_url(settings: Settings) -> str:
    """Where the running `up` put Flower (a free port if its own was taken), else where it would."""
    state = read_state(settings)
    if state is not None and state.flower_url:
        return state.flower_url
    return f"http://127.0.0.1:{settings.flower_port}/"


def log_dir(settings: Settings) -> Path:
    return settings.log_dir or settings.home / LOGS_DIR


def running_pid(settings: Settings) -> int | None:
    """The pid of the `conveyor up` that runs in this home, if one does."""
    try:
        pid = int((settings.home / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) and _is_conveyor_up(pid) else None


class Stack:
    def __init__(self, settings: Settings, devices: str | None = None, flower: bool = True) -> None:
        self.settings = settings
        self.devices = devices or settings.devices
        self.with_flower = flower
        self.redis: LocalRedis | None = None
        self.supervisor = Supervisor()
        self.flower_url: str | None = None
        self.metrics_url: str | None = None
        self.gateway_url: str | None = None
        self.role_urls: dict[str, str] = {}  # role -> its Redis URL (the embedded Redis's stack users)
        self.notes: list[str] = []  # what the user should know (a port that moved, an orphan stopped)

    def start(self) -> str:
        """Start everything; return once Redis and Flower answer. Raises RuntimeError, having
        stopped what it started, if something cannot start."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop cleanly even while starting
        home = private_dir(self.settings.home)
        other = running_pid(self.settings)
        if other is not None and other != os.getpid():
            raise RuntimeError(f"conveyor is already up in {home} (pid {other}); `conveyor down` stops it")
        write_private(home / PID_FILE, f"{os.getpid()}\n")
        self._log_to_files()
        try:
            url = self._start_redis()
            self.role_urls = self._make_users(url)  # each child gets only its own role's login
            # The children keep this process's input roots (its current directory among them), and
            # write their logs under the logs directory (the worker launcher: one file per worker).
            env = dict(
                os.environ, **QUIET_OUTPUT_ENV, CONVEYOR_REDIS_URL=url,
                CONVEYOR_INPUT_ROOTS=self.settings.input_roots_env(), CONVEYOR_LOG_DIR=str(self.logs),
                CONVEYOR_LOG_FORMAT=self.settings.log_format,
            )  # fmt: skip
            worker_env, drain = self._as(env, "worker"), self.settings.drain_timeout_s
            self.supervisor.start(
                ChildSpec(
                    "workers",
                    [sys.executable, "-m", "workers.launch", "--devices", self.devices, "--exit-with-parent"],
                    # The launcher gives its workers their drain plus a margin: wait for all of it.
                    env=worker_env, restart=True, stop_timeout=drain + 20.0, **self._log("workers"),
                )  # fmt: skip
            )
            if self.with_flower:
                self._start_flower(env)
            self._start_exporter(env)
            self._start_gateway(env)
        except BaseException:
            self.stop()
            raise
        ready = {
            "pid": os.getpid(), "flower_url": self.flower_url, "metrics_url": self.metrics_url,
            "gateway_url": self.gateway_url,
        }  # fmt: skip
        write_private(home / READY_FILE, json.dumps(ready))
        return url

    @property
    def logs(self) -> Path:
        return log_dir(self.settings)

    def _log(self, name: str) -> dict[str, Any]:
        """A child's output into its own rotating file (shared/log_format.OutputPump)."""
        return {
            "log": self.logs / f"{name}.log", "log_max_bytes": self.settings.log_max_mb * 2**20,
            "log_backups": self.settings.log_backups, "log_format": self.settings.log_format,
        }  # fmt: skip

    def _log_to_files(self) -> None:
        """This process's own records (the supervisor's restarts and stops) into logs/up.log, and
        to standard error as before."""
        private_dir(self.logs)
        configure_logging("up", fmt=self.settings.log_format)
        handler = rotating_file(self.logs / "up.log", self.settings.log_max_mb * 2**20, self.settings.log_backups)
        handler.setFormatter(logging.getLogger().handlers[0].formatter)
        logging.getLogger().addHandler(handler)

    def _start_redis(self) -> str:
        if self.settings.redis_url:
            return self.settings.redis_url
        self.redis = LocalRedis(self.settings.home)
        orphan = self.redis.stop_orphan()
        if orphan is not None:
            self.notes.append(f"stopped redis-server pid {orphan}, left running by a `conveyor up` killed earlier")
        spec = self.redis.spec()
        spec.stop_timeout = STOP_TIMEOUT_S
        self.redis.child = self.supervisor.start(spec)
        self.redis.wait_ready()
        self.supervisor.on_restart = self._on_restart
        return self.redis.url

    def _make_users(self, url: str) -> dict[str, str]:
        """On the embedded Redis: a least-privilege user per role (producers/tenancy/roles.py); the
        recorded URL, which the CLI reads, becomes the admin user's. role -> URL; {} elsewhere."""
        if self.redis is None or not self.settings.redis_acl:
            return {}
        from producers.tenancy.users import stack_users
        from shared.redis_connect import redis_client

        superuser = redis_client(self.settings, url, socket_timeout=10)
        try:
            urls = stack_users(superuser, self.settings.home, url)
        finally:
            superuser.close()
        write_private(self.settings.home / REDIS_URL_FILE, urls["admin"] + "\n")
        return urls

    def _as(self, env: dict[str, str], role: str) -> dict[str, str]:
        """``env`` with the Redis login of ``role`` (unchanged without stack users)."""
        url = self.role_urls.get(role)
        return {**env, "CONVEYOR_REDIS_URL": url} if url else env

    def _flower_env(self, env: dict[str, str]) -> dict[str, str]:
        """Flower's Redis login and logins: the monitor role, watching only, unless CONVEYOR_FLOWER_CONTROL;
        its monitor login is read-only either way (producers/flower_secure.py)."""
        read_only = {READ_ONLY_USERS_ENV: self.settings.flower_monitor_user}
        if self.settings.flower_control:
            return {**self._as(env, "admin"), **read_only}
        return {**self._as(env, "monitor"), **read_only, WATCH_ONLY_ENV: "1"}

    def _on_restart(self, child: Child) -> None:
        if self.redis is not None and child.spec.name == "redis-server":
            self.redis.child = child  # same config: same port, password and AOF
            print(f"redis-server restarted on port {self.redis.port} (pid {child.pid})", file=sys.stderr, flush=True)

    def _start_flower(self, env: dict[str, str]) -> None:
        if importlib.util.find_spec("flower") is None:
            self.notes.append("flower is not installed (pip install 'conveyor[monitor]'); running without it")
            return
        port = self.settings.flower_port
        if not port_is_free(port):
            moved = free_port()
            self.notes.append(f"port {port} is taken; Flower listens on {moved} instead")
            port = moved
        user, password = flower_login(self.settings)
        monitor_user, monitor_pw = flower_monitor_login(self.settings)
        child = self.supervisor.start(
            ChildSpec(
                "flower",
                [
                    # producers.flower_secure: `celery`, with Flower's /metrics and /healthcheck behind its login
                    sys.executable, "-m", "producers.flower_secure", "-A", "producers.flower_app", "flower",
                    "--address=127.0.0.1", f"--port={port}", "--persistent=False", "--logging=warning",
                ],
                # Flower reads FLOWER_<OPTION> variables: the logins stay out of `ps`.
                env={**self._flower_env(env), "FLOWER_BASIC_AUTH": f"{user}:{password},{monitor_user}:{monitor_pw}"},
                restart=True, stop_timeout=STOP_TIMEOUT_S, **self._log("flower"),
            )
        )  # fmt: skip
        self.flower_url = f"http://127.0.0.1:{port}/"
        self.notes.append(
            f"Flower's read-only login: {monitor_user}, password in {self.settings.home / FLOWER_MONITOR_PASSWORD_FILE}"
        )
        _wait_for_http(f"{self.flower_url}healthcheck", child, timeout=90.0, what="Flower")

    def _start_exporter(self, env: dict[str, str]) -> None:
        """Conveyor's Prometheus exporter (producers/exporter.py), behind Flower's login."""
        if importlib.util.find_spec("prometheus_client") is None:
            self.notes.append("prometheus-client is not installed (pip install 'conveyor[monitor]'); no metrics")
            return
        port = self.settings.metrics_port
        if not port_is_free(port, self.settings.metrics_address):
            moved = free_port()
            self.notes.append(f"port {port} is taken; the metrics exporter listens on {moved} instead")
            port = moved
        child = self.supervisor.start(
            ChildSpec(
                "exporter",  # under the monitor role: it only watches (producers.tenancy.monitor_process)
                [sys.executable, "-m", "producers.tenancy.monitor_process", "producers.exporter", "--port", str(port)],
                env=self._as(env, "monitor"), restart=True, stop_timeout=STOP_TIMEOUT_S, **self._log("exporter"),
            )
        )  # fmt: skip
        host = self.settings.metrics_address
        self.metrics_url = f"http://{host}:{port}/metrics"
        _wait_for_http(self.metrics_url, child, timeout=90.0, what="the metrics exporter")

    def _start_gateway(self, env: dict[str, str]) -> None:
        """The HTTP gateway (producers/gateway/): jobs over HTTP with API keys (`conveyor keys add`)."""
        if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
            self.notes.append("fastapi/uvicorn are not installed (pip install 'conveyor[server]'); no HTTP gateway")
            return
        port, address = self.settings.gateway_port, self.settings.gateway_address
        if not port_is_free(port, address):
            moved = free_port()
            self.notes.append(f"port {port} is taken; the HTTP gateway listens on {moved} instead")
            port = moved
        child = self.supervisor.start(
            ChildSpec(
                "gateway", [sys.executable, "-m", "producers.gateway", "--port", str(port), "--address", address],
                env=self._as(env, "gateway"), restart=True, stop_timeout=STOP_TIMEOUT_S, **self._log("gateway"),
            )
        )  # fmt: skip
        self.gateway_url = f"http://{address}:{port}/"
        _wait_for_http(f"{self.gateway_url}healthz", child, timeout=90.0, what="the HTTP gateway")

    def wait(self) -> int:
        """Run until Ctrl-C or SIGTERM (a second one stops at once); restart children that die."""
        self.supervisor.install_signal_handlers()
        try:
            self.supervisor.run()
        finally:
            self.stop()
        return 0

    def stop(self) -> None:
        self.supervisor.stop()
        drain_pumps()  # the children's last lines reach their log files before this process exits
        home = self.settings.home
        if self.redis is not None:
            (home / REDIS_URL_FILE).unlink(missing_ok=True)
        (home / READY_FILE).unlink(missing_ok=True)
        with contextlib.suppress(OSError, ValueError):
            if int((home / PID_FILE).read_text()) == os.getpid():
                (home / PID_FILE).unlink()


def _wait_for_http(url: str, child: Child, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{what} exited with {child.returncode} before it answered at {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code == 401:  # it answers, and asks for the login
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not answer at {url} within {timeout:.0f}s")


def start_detached(settings: Settings, devices: str | None, flower: bool, timeout: float = 180.0) -> UpState:
    """Start `conveyor up` in the background; return once it reports itself ready (Redis
    answers, Flower listens), or raise with the end of its log if it exits first."""
    home = private_dir(settings.home)
    other = running_pid(settings)
    if other is not None:
        state = read_state(settings)
        return state if state is not None else UpState(other, None)
    args = [sys.executable, "-m", "producers.cli", "up"] + (["--devices", devices] if devices else [])
    args += [] if flower else ["--no-flower"]
    log_path = home / LOG_FILE
    with open_private_log(log_path) as log:
        proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = read_state(settings)
        if state is not None and state.pid == proc.pid:
            return state
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-1500:]
            raise RuntimeError(f"`conveyor up` exited with {proc.returncode}; the end of {log_path}:\n{tail}")
        time.sleep(0.2)
    raise RuntimeError(f"`conveyor up` was not ready within {timeout:.0f}s; see {log_path}")


def stop_detached(settings: Settings, timeout: float = 30.0) -> list[str]:
    """Stop the `conveyor up` of this home, and a redis-server an `up` killed hard left behind.
    Returns what was stopped, in words."""
    stopped = []
    pid = running_pid(settings)
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):  # its children die with it (parent-death signal)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        stopped.append(f"conveyor up (pid {pid})")
    if not settings.redis_url:
        orphan = LocalRedis(settings.home).stop_orphan()
        if orphan is not None:
            stopped.append(f"redis-server (pid {orphan}) left running by a `conveyor up` killed earlier")
    for name in (PID_FILE, READY_FILE):
        (settings.home / name).unlink(missing_ok=True)
    return stopped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0
    except OSError:
        return True


def _is_conveyor_up(pid: int) -> bool:
    """Whether ``pid`` still runs `conveyor up` (a recorded pid may have been reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS): trust the pid file
    return b"up" in cmdline.split(b"\0")
