"""What `conveyor status` (no job id) does: read a snapshot, print it as a view (a terminal) or
JSON (``--json``, or output to a pipe or file, as scripts read it), once or every few seconds."""

from __future__ import annotations

import sys
import time
from typing import Any

import redis
from rich.console import Console
from rich.live import Live

from producers.cli_errors import redact
from producers.status.snapshot import Snapshot, dumps, read_snapshot
from producers.status.view import render
from shared.settings import Settings

MIN_INTERVAL_S = 0.5


def snapshot(client: redis.Redis, settings: Settings, inspect: Any = None) -> Snapshot:
    snap = read_snapshot(client, settings.metrics_worker_timeout_s, settings.metrics_forget_worker_s)
    if inspect is not None:  # --inspect: Celery's broadcast, for what only the workers themselves know
        return Snapshot(**{**snap.__dict__, "inspected": inspect()})
    return snap


def run(
    client: redis.Redis, settings: Settings, *, as_json: bool, watch: bool, interval: float, inspect: Any = None
) -> None:
    interval = max(MIN_INTERVAL_S, interval)
    as_json = as_json or not sys.stdout.isatty()
    if as_json:
        try:
            while True:
                print(dumps(snapshot(client, settings, inspect)), flush=True)
                if not watch:
                    return
                time.sleep(interval)
        except KeyboardInterrupt:
            return
    where = redact(settings.broker_url())
    console = Console()
    first = snapshot(client, settings, inspect)
    if not watch:
        console.print(render(first, where, width=console.width))
        return
    previous = first
    with Live(render(first, where, width=console.width), console=console, auto_refresh=False, screen=False) as live:
        try:
            while True:
                time.sleep(interval)
                current = snapshot(client, settings, inspect)
                live.update(render(current, where, previous, console.width), refresh=True)
                previous = current
        except KeyboardInterrupt:
            return
