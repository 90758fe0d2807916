"""What each worker says about itself in Redis, every few seconds, so `conveyor status` can show
the workers without a Celery broadcast: the contract between the writer (``workers/presence.py``)
and the reader (``producers/status``). pydantic and the standard library only.

One hash, ``conveyor:workers``: field = the worker's Celery hostname, value = a ``WorkerPresence``
as JSON. A worker overwrites its own field every ``PRESENCE_EVERY_S`` and deletes it when it
stops; a field whose ``beat_at`` is old belongs to a worker that died (a reader shows it as down,
and writers prune fields older than ``FORGET_AFTER_S`` when they start).
"""

from __future__ import annotations

from typing import Final, Literal

from pydantic import BaseModel, Field

PRESENCE_KEY: Final = "conveyor:workers"
PRESENCE_EVERY_S: Final = 2.0
FORGET_AFTER_S: Final = 3600.0
MAX_ENTRY_BYTES: Final = 16_384  # a reader skips anything larger: never a reason to read megabytes


class WorkerPresence(BaseModel):
    hostname: str = Field(max_length=256)
    pid: int
    role: Literal["inference", "training"]
    device: str = Field(description="torch device: cpu, cuda:0 (the GPU the worker was pinned to)")
    queues: list[str] = Field(default_factory=list, max_length=256)
    models: list[str] = Field(default_factory=list, max_length=64, description="models loaded in its cache")
    started_at: float = Field(description="unix time the worker started")
    beat_at: float = Field(description="unix time of this entry")
    held: int = Field(0, description="jobs it holds now (queued in its batchers or running)")
    batches: int = Field(0, description="forward passes since it started")
    items: int = Field(0, description="items in those passes")
    batches_per_s: float = Field(0.0, description="over the last interval between two entries")
    succeeded: int = 0
    failed: int = 0
