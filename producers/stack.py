"""`conveyor up`: the embedded Redis (unless CONVEYOR_REDIS_URL is set), the workers and
Flower, as child processes that stop together. ``--detach`` runs the same in the
background and records its pid, for `conveyor down`."""

from __future__ import annotations

import importlib.util
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from producers.local_redis import LocalRedis, ping
from shared.settings import REDIS_URL_FILE, Settings

PID_FILE = "up.pid"
LOG_FILE = "up.log"
FLOWER_PASSWORD_FILE = "flower.password"


def flower_login(settings: Settings) -> tuple[str, str]:
    if settings.flower_password:
        return settings.flower_user, settings.flower_password
    path = settings.home / FLOWER_PASSWORD_FILE
    if not path.exists():
        settings.home.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(12))
        path.chmod(0o600)
    return settings.flower_user, path.read_text().strip()


def flower_url(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.flower_port}/"


class Stack:
    def __init__(self, settings: Settings, devices: str, flower: bool = True) -> None:
        self.settings = settings
        self.devices = devices
        self.with_flower = flower
        self.redis: LocalRedis | None = None
        self.children: list[subprocess.Popen[bytes]] = []

    def start(self) -> str:
        url = self.settings.redis_url
        if not url:
            recorded = self.settings.home / REDIS_URL_FILE
            if recorded.exists() and ping(recorded.read_text().strip()):
                url = recorded.read_text().strip()  # another `up` already runs it
            else:
                self.redis = LocalRedis(self.settings.home)
                url = self.redis.start()
        env = dict(os.environ, CONVEYOR_REDIS_URL=url)
        self.children.append(
            subprocess.Popen([sys.executable, "-m", "workers.launch", "--devices", self.devices, "--exit-with-parent"], env=env)
        )
        if self.with_flower and importlib.util.find_spec("flower") is not None:
            user, password = flower_login(self.settings)
            self.children.append(
                subprocess.Popen(
                    [
                        sys.executable, "-m", "celery", "--broker", url, "flower",
                        "--address=127.0.0.1", f"--port={self.settings.flower_port}",
                        f"--basic-auth={user}:{password}", "--persistent=False", "--logging=warning",
                    ],  # fmt: skip
                    env=env,
                )
            )
        elif self.with_flower:
            print("flower is not installed (pip install 'conveyor[monitor]'); running without it", file=sys.stderr)
        return url

    def wait(self) -> int:
        """Run until Ctrl-C or SIGTERM, or until a child dies."""
        stop = False

        def on_signal(_signum: int, _frame: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        code = 0
        while not stop:
            for child in self.children:
                if child.poll() is not None:
                    print(f"{child.args[2] if len(child.args) > 2 else child.args} exited ({child.returncode})")
                    code, stop = child.returncode or 1, True
            time.sleep(0.3)
        self.stop()
        return code

    def stop(self) -> None:
        for child in reversed(self.children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in reversed(self.children):
            try:
                child.wait(40)
            except subprocess.TimeoutExpired:
                child.kill()
        if self.redis is not None:
            self.redis.stop()


def start_detached(settings: Settings, devices: str, flower: bool) -> int:
    """Start `conveyor up` in the background; return its pid once Redis answers."""
    settings.home.mkdir(parents=True, exist_ok=True)
    pid_file = settings.home / PID_FILE
    if pid_file.exists() and _alive(int(pid_file.read_text())):
        return int(pid_file.read_text())
    args = [sys.executable, "-m", "producers.cli", "up", "--devices", devices] + ([] if flower else ["--no-flower"])
    with open(settings.home / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    pid_file.write_text(str(proc.pid))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`conveyor up` exited with {proc.returncode}; see {settings.home / LOG_FILE}")
        try:
            if ping(settings.broker_url()):
                return proc.pid
        except RuntimeError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"Redis did not come up within 60s; see {settings.home / LOG_FILE}")


def stop_detached(settings: Settings, timeout: float = 60.0) -> bool:
    pid_file = settings.home / PID_FILE
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text())
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return True


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
