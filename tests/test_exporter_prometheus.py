"""Real Prometheus (Debian's package, 2.42, with promtool): the alert rules load and each alert
fires on the series that should fire it (promtool), and a Prometheus server scrapes
`conveyor exporter` with Flower's login and its API returns Conveyor's series.

scripts/test installs the package with apt where promtool is missing. Without it these tests
skip, saying so, or fail under CI=true."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import ROOT
from test_metrics import PASSWORD, db_url

from producers.local_redis import free_port
from shared.supervisor import Child, ChildSpec, spawn
from workers.metrics import WorkerMetrics

RULES_DIR = ROOT / "scripts" / "prometheus"
RULES = RULES_DIR / "conveyor-alerts.yml"
RULES_TEST = RULES_DIR / "conveyor-alerts.test.yml"
ALERTS = {
    "ConveyorWorkerDown",
    "ConveyorQueueTooOld",
    "ConveyorJobFailureRatioHigh",
    "ConveyorDeadLetterQueueGrowing",
    "ConveyorRedisUnreachable",
}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed: apt-get install prometheus (Debian's package; scripts/test installs it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must have this: {reason}", pytrace=False)
        pytest.skip(reason)
    return path


def test_promtool_checks_the_rules_and_each_alert_fires_when_it_should() -> None:
    promtool = _tool("promtool")
    checked = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in checked.stdout
    tested = subprocess.run(
        [promtool, "test", "rules", RULES_TEST.name], cwd=RULES_DIR, capture_output=True, text=True, check=False
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # Every alert of the rules file has a case where it fires.
    cases = RULES_TEST.read_text()
    for alert in ALERTS:
        assert f"alertname: {alert}\n        exp_alerts:\n          - exp_labels" in cases, alert


@pytest.fixture
def exporter_process(redis_url: str, conveyor_env: dict[str, str], tmp_path: Path) -> Iterator[tuple[int, str]]:
    url = db_url(redis_url, 10)
    with redis.Redis.from_url(url) as r:
        r.flushdb()
    port = free_port()
    env = dict(conveyor_env, CONVEYOR_REDIS_URL=url, CONVEYOR_HOME=str(tmp_path), CONVEYOR_FLOWER_PASSWORD=PASSWORD)
    child = spawn(
        ChildSpec("exporter", [sys.executable, "-m", "producers.cli", "exporter", "--port", str(port)],
                  env=env, cwd=ROOT, log=tmp_path / "exporter.log")
    )  # fmt: skip
    yield port, url
    child.stop(10)
    with redis.Redis.from_url(url) as r:
        r.flushdb()


def _query(base: str, promql: str) -> list[dict[str, object]]:
    with urllib.request.urlopen(f"{base}/api/v1/query?query={urllib.parse.quote(promql)}", timeout=5) as response:
        data = json.load(response)
    assert data["status"] == "success", data
    return list(data["data"]["result"])


def _start_prometheus(tmp_path: Path, exporter_port: int, password: str) -> tuple[Child, str]:
    prometheus = _tool("prometheus")
    (tmp_path / "password").write_text(password)
    shutil.copy(RULES, tmp_path / RULES.name)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [RULES.name],
        "scrape_configs": [
            {
                "job_name": "conveyor",
                "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}],
                "basic_auth": {"username": "conveyor", "password_file": str(tmp_path / "password")},
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))  # YAML is a superset of JSON
    port = free_port()
    argv = [
        prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
    ]  # fmt: skip
    child = spawn(ChildSpec("prometheus", argv, cwd=tmp_path, log=tmp_path / "prometheus.log"))
    return child, f"http://127.0.0.1:{port}"


def _wait(what: str, check: Callable[[], Any], timeout: float, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = check()
        except OSError:
            found = None
        if found:
            return found
        time.sleep(0.5)
    pytest.fail(f"{what} not seen within {timeout:.0f}s; {log.name}:\n{log.read_text(errors='replace')[-3000:]}")


def test_prometheus_scrapes_the_exporter_with_the_login(exporter_process: tuple[int, str], tmp_path: Path) -> None:
    exporter_port, url = exporter_process
    with redis.Redis.from_url(url) as client:
        recorder = WorkerMetrics(client, "cpu@prom")
        for _ in range(3):
            recorder.job("classify", "SUCCESS", 0.01, 0.02)
        recorder.batch("classify", 3)
        recorder.stop()
    prom, base = _start_prometheus(tmp_path, exporter_port, PASSWORD)
    log = tmp_path / "prometheus.log"
    try:
        _wait("the scrape target up", lambda: _query(base, 'up{job="conveyor"} == 1'), 60, log)
        result = _query(base, 'celery_queue_length{queue_name="conveyor.classify"}')
        assert [r["value"][1] for r in result] == ["0"]  # type: ignore[index]
        jobs = _query(base, 'conveyor_jobs_total{job_type="classify", state="SUCCESS"}')
        assert [r["value"][1] for r in jobs] == ["3"]  # type: ignore[index]
        batches = _query(base, 'conveyor_batch_size_bucket{job_type="classify", le="4.0"}')
        assert [r["value"][1] for r in batches] == ["1"]  # type: ignore[index]
        with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=5) as response:
            groups = json.load(response)["data"]["groups"]
        assert {rule["name"] for g in groups for rule in g["rules"]} == ALERTS
    finally:
        prom.stop(10)

    # The same Prometheus with a wrong password: the target is down, with a 401.
    (tmp_path / "wrong").mkdir()
    prom, base = _start_prometheus(tmp_path / "wrong", exporter_port, "not-the-password")
    try:
        targets = _wait(
            "the failed scrape",
            lambda: [t for t in _targets(base) if t["health"] == "down"],
            60,
            tmp_path / "wrong" / "prometheus.log",
        )
        assert "401" in targets[0]["lastError"]
    finally:
        prom.stop(10)


def _targets(base: str) -> list[dict[str, str]]:
    with urllib.request.urlopen(f"{base}/api/v1/targets", timeout=5) as response:
        return list(json.load(response)["data"]["activeTargets"])
