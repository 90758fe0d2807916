"""compose.yaml ships no password and puts none on a command line: every secret is a required
variable (``${VAR:?message}``, so `docker compose up` refuses to start without it) that reaches
the services through their environment."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

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
