"""Helpers shared by the end-to-end tests of the worker: labelled texts, a worker started and
waited for, its Celery processes, and waiting for results straight from Redis."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import WorkerProcess

from producers.client import Client

LABELS = ["sports", "finance", "weather", "cooking"]
TOPICAL = [
    ("The striker scored twice and the team won the championship match.", "sports"),
    ("The central bank raised interest rates and stock markets fell sharply.", "finance"),
    ("Heavy rain and strong winds are forecast for the weekend, with snow in the hills.", "weather"),
    ("Whisk the eggs with sugar, fold in the flour and bake the cake for forty minutes.", "cooking"),
    ("The goalkeeper saved a penalty in the final minute of the football game.", "sports"),
    ("Shares of the company jumped after quarterly earnings beat analyst forecasts.", "finance"),
]


def start_worker(env: dict[str, str], log: Path, sdk: Client) -> WorkerProcess:
    proc = WorkerProcess(env, log, ["--only", "inference"])
    try:
        sdk.wait_for_workers(180, ["conveyor.classify"])
    except TimeoutError:
        proc.stop()
        pytest.fail("worker did not start:\n" + proc.tail())
    return proc


def celery_children(supervisor_pid: int) -> list[int]:
    """Pids of the Celery worker processes the supervisor started."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == supervisor_pid and b"celery" in cmd:
            found.append(int(entry.name))
    return found


def meta(r: redis.Redis, job_id: str) -> dict[str, Any] | None:
    raw = r.get(f"celery-task-meta-{job_id}")
    return None if raw is None else json.loads(raw)


def wait_for(r: redis.Redis, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    end = time.monotonic() + timeout
    found: dict[str, dict[str, Any]] = {}
    while time.monotonic() < end:
        pipe = r.pipeline()
        missing = [i for i in ids if i not in found]
        for i in missing:
            pipe.get(f"celery-task-meta-{i}")
        for i, raw in zip(missing, pipe.execute()):
            if raw is not None and json.loads(raw)["status"] in ("SUCCESS", "FAILURE", "REVOKED"):
                found[i] = json.loads(raw)
        if len(found) == len(ids):
            return found
        time.sleep(0.25)
    raise AssertionError(f"{len(ids) - len(found)} of {len(ids)} jobs did not finish in {timeout:.0f}s")
