"""What both trainers share: the outcome they return, progress pacing and cancellation."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from shared.errors import JobCancelled
from shared.model_store import ModelStore, ModelVersion
from shared.results import Progress

ProgressFn = Callable[[Progress], None]
StopFn = Callable[[], bool]
# train_recommender and fine_tune: (job, store, checkpoint_dir, progress, should_stop, device) -> outcome
Trainer = Callable[[Any, ModelStore, Path, ProgressFn, StopFn, str], "TrainingOutcome"]

PROGRESS_EVERY_S = 2.0
STOP_CHECK_EVERY_S = 0.2  # should_stop may ask Redis; steps can take a millisecond


@dataclass(frozen=True)
class TrainingOutcome:
    version: ModelVersion
    metrics: dict[str, float]
    epochs_run: int  # epochs trained by this call, not counting those restored
    resumed_from_epoch: int  # epochs restored from a checkpoint (0: started fresh)
    extra: dict[str, Any] = field(default_factory=dict)


def job_fingerprint(job: BaseModel, data_sha256: str, ignore: tuple[str, ...] = ()) -> str:
    """Identifies what a checkpoint was trained on: the data and every setting that shapes training.

    The envelope (id, priority, times) is left out so that a redelivered or resubmitted job
    resumes; ``epochs`` too, so a job rerun with more epochs continues where it stopped.
    """
    envelope = {"id", "type", "schema_version", "priority", "submitted_at", "idempotency_key", "deadline", "epochs"}
    settings = job.model_dump_json(exclude=envelope | set(ignore))
    return hashlib.sha256(f"{data_sha256}|{settings}".encode()).hexdigest()


class Pacer:
    """Reports progress at most every ``PROGRESS_EVERY_S`` (and at each epoch end) and raises
    ``JobCancelled`` as soon as ``should_stop`` says so."""

    def __init__(self, progress: ProgressFn, should_stop: StopFn, epochs: int, steps: int) -> None:
        self._progress = progress
        self._should_stop = should_stop
        self.epochs = epochs
        self.steps = steps
        self._last_report = 0.0
        self._last_check = 0.0
        self._epoch_start = time.monotonic()
        self._epoch_items = 0

    def check(self) -> None:
        self._last_check = time.monotonic()
        if self._should_stop():
            raise JobCancelled("cancelled during training; nothing was published")

    def start_epoch(self) -> None:
        self._epoch_start = time.monotonic()
        self._epoch_items = 0

    def step(self, epoch: int, step: int, items: int, loss: float | None, force: bool = False) -> None:
        """Record ``items`` processed by step ``step`` (1-based) of ``epoch`` (1-based)."""
        self._epoch_items += items
        now = time.monotonic()
        if force or now - self._last_report >= PROGRESS_EVERY_S:
            self._last_report = now
            elapsed = max(now - self._epoch_start, 1e-9)
            per_step = elapsed / max(step, 1)
            remaining = (self.steps - step) + (self.epochs - epoch) * self.steps
            self._progress(
                Progress(
                    epoch=epoch,
                    epochs=self.epochs,
                    step=step,
                    steps=self.steps,
                    loss=loss,
                    items_per_s=self._epoch_items / elapsed,
                    eta_s=per_step * remaining,
                )
            )
        if force or now - self._last_check >= STOP_CHECK_EVERY_S:
            self.check()

    def epoch_seconds(self) -> float:
        return time.monotonic() - self._epoch_start
