"""Train and fine-tune as Celery jobs: progress as task state and, for Flower, as events;
checkpoints keyed by job id (a redelivered job resumes); cancellation through a Redis flag
checked during training.

Exactly once in effect: a published version records the job id that produced it and the
result that job returned (``ModelStore.publish``), so a job redelivered after it published
(its worker died before the ack) returns that result again instead of training once more and
moving ``@latest`` to a version N+1.

A job id never becomes a path: the checkpoint directory is named by the id's SHA-256
(``checkpoint.directory_for``), and it is removed only when it lies inside the checkpoint root.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from celery import Task

from shared import kinds
from shared.errors import JobCancelled
from shared.jobs import JobBase
from shared.model_store import RESULT_KEY, ModelVersion
from shared.names import CANCEL_KEY_PREFIX
from shared.redis_connect import redis_client
from shared.results import JobMeta, Progress, TrainingResult
from workers.runtime import Runtime, check_deadline
from workers.training import checkpoint
from workers.training.loop import Trainer, TrainingOutcome

log = logging.getLogger(__name__)

PROGRESS_EVENT_EVERY_S = 1.0


def checkpoint_root(runtime: Runtime) -> Path:
    return runtime.settings.home / "checkpoints"


def checkpoint_dir(runtime: Runtime, job: JobBase) -> Path:
    """``CONVEYOR_HOME/checkpoints/<sha256(job id)>``: stable per job, never the id itself."""
    return checkpoint.directory_for(checkpoint_root(runtime), job.id)


def run_long_job(task: Task, job: JobBase, runtime: Runtime, worker: str) -> TrainingResult:
    started = time.monotonic()
    picked_at = datetime.now(UTC)
    ckpt = checkpoint_dir(runtime, job)
    output_name = getattr(job, "output_name", None)  # every training kind names what it publishes
    if not isinstance(output_name, str):
        raise TypeError(f"{job.type} jobs name no output_name: not a training kind")
    published = runtime.store.find_by_job(output_name, job.id)
    if published is not None:
        # Redelivered after it published (the worker died before the ack): its effect happened.
        log.info("job %s already published %s; returning that result without training", job.id, published.ref)
        checkpoint.remove_owned_dir(ckpt, checkpoint_root(runtime))
        return _result(job, published, None, runtime, worker, picked_at, started)

    check_deadline(job)
    client = redis_client(runtime.settings)
    cancel_key = CANCEL_KEY_PREFIX + job.id
    if client.exists(cancel_key):
        client.close()
        raise JobCancelled(f"job {job.id} was cancelled before it started")

    progress = ProgressReporter(task)

    def should_stop() -> bool:
        try:
            return bool(client.exists(cancel_key))
        except redis.RedisError as exc:  # Redis away (a failover, a restart): train on, ask again next time
            log.warning("job %s: could not look for a cancel (%s: %s); going on", job.id, type(exc).__name__, exc)
            return False

    trainer = _trainer(job)
    ckpt.mkdir(parents=True, exist_ok=True)
    try:
        outcome = trainer(job, runtime.store, ckpt, progress, should_stop, runtime.device)
    except JobCancelled:
        checkpoint.remove_owned_dir(ckpt, checkpoint_root(runtime))  # a cancelled job is not resumed
        raise
    finally:
        client.close()
    checkpoint.remove_owned_dir(ckpt, checkpoint_root(runtime))
    return _result(job, outcome.version, outcome, runtime, worker, picked_at, started)


class ProgressReporter:
    """A long job's progress, to both places people look: the PROGRESS state in the result
    backend (``status()``, ``conveyor status ID``) at every report, and, for Flower, which builds
    its view from events alone, a ``task-progress`` event (Celery's ``Task.send_event``; Flower
    takes any ``task-*`` event, shows its type as the state, PROGRESS, and its ``result`` field)
    at most every ``PROGRESS_EVENT_EVERY_S``: short epochs report each end, events stay bounded."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self._last_event = -PROGRESS_EVENT_EVERY_S
        self._events = bool(task.app.conf.worker_send_task_events)  # as Celery's own task events

    def __call__(self, p: Progress) -> None:
        fields = p.model_dump(mode="json")
        try:  # the backend retries through a failover (result_backend_always_retry); past that, train on
            self.task.update_state(state="PROGRESS", meta=fields)
        except Exception as exc:
            log.warning("could not record the progress of job %s: %s", self.task.request.id, exc)
        now = time.monotonic()
        if not self._events or now - self._last_event < PROGRESS_EVENT_EVERY_S:
            return
        self._last_event = now
        try:
            self.task.send_event("task-progress", retry=False, result=progress_line(p), progress=fields)
        except Exception as exc:  # an event is for watching: losing one must not stop training
            log.warning("could not send the progress event of job %s: %s", self.task.request.id, exc)


def progress_line(p: Progress) -> str:
    """``epoch 2/5, step 10/50, loss 0.4321, 812 items/s, ETA 0:01:10``: what Flower shows as the result."""
    parts = [f"epoch {p.epoch}/{p.epochs}", f"step {p.step}/{p.steps}"]
    if p.loss is not None:
        parts.append(f"loss {p.loss:.4f}")
    if p.items_per_s is not None:
        parts.append(f"{p.items_per_s:,.0f} items/s")
    if p.eta_s is not None:
        whole = round(p.eta_s)
        parts.append(f"ETA {whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}")
    return ", ".join(parts)


def recorded_result(version: ModelVersion) -> dict[str, Any] | None:
    """The result fields the publishing job recorded in the version's metadata, if any."""
    recorded = version.metadata.get(RESULT_KEY)
    return recorded if isinstance(recorded, dict) else None


def _result(
    job: JobBase,
    version: ModelVersion,
    outcome: TrainingOutcome | None,
    runtime: Runtime,
    worker: str,
    picked_at: datetime,
    started: float,
) -> TrainingResult:
    # The version's record wins over this run's outcome: when two runs of one job raced, the
    # store kept the first version, and both answer with what produced it.
    recorded = recorded_result(version)
    if recorded is not None:
        fields: dict[str, Any] = {
            "metrics": recorded.get("metrics", {}),
            "epochs_run": recorded.get("epochs_run", 0),
            "resumed_from_epoch": recorded.get("resumed_from_epoch", 0),
            "extra": recorded.get("extra", {}),
        }
    elif outcome is not None:
        fields = {
            "metrics": outcome.metrics,
            "epochs_run": outcome.epochs_run,
            "resumed_from_epoch": outcome.resumed_from_epoch,
            "extra": outcome.extra,
        }
    else:  # a version published before results were recorded: what its metadata holds
        fields = {"metrics": version.metadata.get("metrics", {}), "epochs_run": 0, "extra": {}}
    return TrainingResult(
        job_id=job.id,
        type=job.type,
        model=version.ref,
        version=version.version or 0,
        **fields,
        meta=JobMeta(
            worker=worker,
            device=runtime.device,
            model=version.ref,
            queue_ms=round((picked_at - job.submitted_at).total_seconds() * 1000.0, 3),
            run_ms=round((time.monotonic() - started) * 1000.0, 3),
        ),
    )


def _trainer(job: JobBase) -> Trainer:
    """The kind's trainer, from the registry's import path."""
    trainer: Trainer = kinds.import_path(kinds.get(job.type).runner)
    return trainer
