"""The numbers `conveyor status --json` prints, less the workers: queues, dead letters, and per
job type the jobs by state, batches, mean sizes, times and their p50/p95. Kept for its importers;
the reading lives in producers/status/snapshot.py (one reading for the view and the JSON)."""

from __future__ import annotations

from typing import Any

import redis

from producers.status.snapshot import as_json, read_snapshot


def overview(client: redis.Redis) -> dict[str, Any]:
    data = as_json(read_snapshot(client))
    data.pop("workers")
    return data
