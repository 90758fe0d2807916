"""`conveyor up`: embedded Redis, workers and Flower behind basic auth; Ctrl-C stops all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path

import pytest
from conftest import ROOT

from producers.local_redis import free_port

pytestmark = pytest.mark.slow


def _get(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_up_runs_redis_workers_and_flower_and_ctrl_c_stops_them(tmp_path: Path) -> None:
    pytest.importorskip("flower")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "CONVEYOR_REDIS_URL"}  # the embedded default
    env.update(CONVEYOR_HOME=str(tmp_path), CONVEYOR_FLOWER_PORT=str(port), CONVEYOR_MODEL_DIR=str(tmp_path / "m"))
    up = subprocess.Popen(
        [sys.executable, "-m", "producers.cli", "up", "--devices", "cpu"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        run = lambda *a: subprocess.run(  # noqa: E731
            [sys.executable, "-m", "producers.cli", *a], env=env, capture_output=True, text=True, timeout=120
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            done = run("submit", "classify", "--text", "Heavy snow is expected tonight", "--labels",
                       "weather,finance", "--wait", "--timeout", "60")  # fmt: skip
            if done.returncode == 0:
                break
            time.sleep(2)
        assert '"label": "weather"' in done.stdout, done.stderr
        password = (tmp_path / "flower.password").read_text().strip()
        flower = f"http://127.0.0.1:{port}"
        while _get(f"{flower}/healthcheck", ("conveyor", password)) != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _get(f"{flower}/api/workers") == 401
        assert _get(f"{flower}/metrics") == 401 and _get(f"{flower}/healthcheck") == 401
        metrics_url = json.loads((tmp_path / "up.ready").read_text())["metrics_url"]  # Conveyor's exporter
        assert _get(metrics_url) == 401 and _get(metrics_url, ("conveyor", password)) == 200
        assert _get(f"{flower}/api/workers", ("conveyor", password)) == 200
        assert "redis://" in (tmp_path / "redis.url").read_text()
    finally:
        up.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        out, _ = up.communicate(timeout=120)
    assert up.returncode == 0, out[-3000:]
    assert time.monotonic() - interrupted < 15, "Ctrl-C should stop everything within seconds"
    assert not (tmp_path / "redis.url").exists()  # the embedded Redis stopped and said so
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout
    assert not leftovers.strip(), leftovers
