"""compose.yaml ships no password and puts none on a command line: every secret is a required
variable (``${VAR:?message}``, so `docker compose up` refuses to start without it) that reaches
the services through their environment."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import need

COMPOSE = Path(__file__).resolve().parents[1] / "compose.yaml"
SECRET = re.compile(r"\$\{(\w*PASSWORD\w*)(:?[-?+]?)([^}]*)\}")


def test_every_secret_is_required_and_none_has_a_default() -> None:
    uses = SECRET.findall(COMPOSE.read_text())
    assert {name for name, _, _ in uses} == {
        "REDIS_PASSWORD",
        "WORKER_REDIS_PASSWORD",
        "MONITOR_REDIS_PASSWORD",
        "FLOWER_PASSWORD",
    }
    for name, operator, message in uses:
        assert operator == ":?" and message.strip(), f"${{{name}}} must be written ${{{name}:?message}}"


def test_no_secret_on_a_command_line() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name, service in services.items():
        command = service.get("command", [])
        text = " ".join(command) if isinstance(command, list) else str(command)
        assert not SECRET.search(text), f"{name}: a password is interpolated into its command line"
        assert "requirepass" not in text or "$$REDIS_PASSWORD" in text, name  # read by the shell, from env
        assert "--basic-auth" not in text and "--broker" not in text, f"{name}: login or broker URL in argv"
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"].startswith("conveyor:${FLOWER_PASSWORD:?")


SENTINEL_COMPOSE = COMPOSE.with_name("compose.sentinel.yaml")
DUMMY_SECRETS = {
    "REDIS_PASSWORD": "a", "WORKER_REDIS_PASSWORD": "b", "MONITOR_REDIS_PASSWORD": "c", "FLOWER_PASSWORD": "d",
}  # fmt: skip


def _compose_command() -> list[str]:
    """Docker's compose plugin, or the standalone docker-compose (scripts/test installs Debian's)."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    if standalone:
        return [standalone]
    need("neither `docker compose` nor docker-compose is installed")


@pytest.mark.parametrize("path", [COMPOSE, SENTINEL_COMPOSE], ids=lambda p: p.name)
def test_compose_files_are_valid_and_refuse_to_start_without_their_secrets(path: Path) -> None:
    compose = _compose_command()
    ok = subprocess.run([*compose, "-f", str(path), "config", "-q"], env=dict(os.environ, **DUMMY_SECRETS),
                        capture_output=True, text=True, check=False)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    clean = {k: v for k, v in os.environ.items() if "PASSWORD" not in k}
    missing = subprocess.run([*compose, "-f", str(path), "config", "-q"], env=clean, capture_output=True,
                             text=True, check=False)  # fmt: skip
    assert missing.returncode != 0 and "PASSWORD" in missing.stderr


def test_both_layouts_run_the_exporter() -> None:
    for path in (COMPOSE, SENTINEL_COMPOSE):
        exporter = yaml.safe_load(path.read_text())["services"]["exporter"]
        assert exporter["command"][:2] == ["conveyor", "exporter"], path.name


def test_sentinel_layout_has_no_single_redis_to_lose() -> None:
    text = SENTINEL_COMPOSE.read_text()
    for name, _, message in SECRET.findall(text):
        assert name in DUMMY_SECRETS and message.strip(), name
    services = yaml.safe_load(text)["services"]
    sentinels = [name for name in services if name.startswith("sentinel-")]
    assert len(sentinels) == 3
    for name in sentinels:
        command = " ".join(services[name]["command"])
        assert "--sentinel" in command and "sentinel monitor mymaster redis-master 6379 2" in command
    replica = " ".join(services["redis-replica"]["command"])
    assert "replicaof redis-master 6379" in replica
    for role in ("redis-master", "redis-replica"):  # either may be master: both wake idle workers
        assert "notify-keyspace-events Kl" in " ".join(services[role]["command"]) and "masterauth" in replica
    for name in ("worker", "flower", "exporter"):
        env = services[name]["environment"]
        url = env["CONVEYOR_REDIS_URL"]
        assert url.count("sentinel://") == 3 and all(f"@{s}:26379" in url for s in sentinels), name
        assert env["CONVEYOR_SENTINEL_MASTER"] == "mymaster", name
        assert env["CONVEYOR_WAIT_REPLICAS"] == "1", name
        command = services[name].get("command", [])
        assert not SECRET.search(" ".join(command)), f"{name}: a password on its command line"
