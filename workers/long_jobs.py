"""Train and fine-tune as Celery jobs: progress as task state, checkpoints keyed by job id
(a redelivered job resumes), cancellation through a Redis flag checked during training."""

from __future__ import annotations

import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import redis
from celery import Task

from shared.errors import JobCancelled
from shared.jobs import FineTuneJob, JobBase, TrainJob
from shared.names import CANCEL_KEY_PREFIX
from shared.results import JobMeta, Progress, TrainingResult
from workers.runtime import Runtime, check_deadline
from workers.training.loop import Trainer


def checkpoint_dir(runtime: Runtime, job: JobBase) -> Path:
    return runtime.settings.home / "checkpoints" / job.id


def run_long_job(task: Task, job: TrainJob | FineTuneJob, runtime: Runtime, worker: str) -> TrainingResult:
    started = time.monotonic()
    picked_at = datetime.now(UTC)
    check_deadline(job)
    client = redis.Redis.from_url(runtime.settings.broker_url())
    cancel_key = CANCEL_KEY_PREFIX + job.id
    if client.exists(cancel_key):
        raise JobCancelled(f"job {job.id} was cancelled before it started")

    def progress(p: Progress) -> None:
        task.update_state(state="PROGRESS", meta=p.model_dump(mode="json"))

    def should_stop() -> bool:
        return bool(client.exists(cancel_key))

    trainer = _trainer(job)
    ckpt = checkpoint_dir(runtime, job)
    ckpt.mkdir(parents=True, exist_ok=True)
    try:
        outcome = trainer(job, runtime.store, ckpt, progress, should_stop, runtime.device)
    except JobCancelled:
        shutil.rmtree(ckpt, ignore_errors=True)  # a cancelled job is not resumed
        raise
    finally:
        client.close()
    shutil.rmtree(ckpt, ignore_errors=True)
    return TrainingResult(
        job_id=job.id,
        type=job.type,
        model=outcome.version.ref,
        version=outcome.version.version or 0,
        metrics=outcome.metrics,
        epochs_run=outcome.epochs_run,
        resumed_from_epoch=outcome.resumed_from_epoch,
        extra=outcome.extra,
        meta=JobMeta(
            worker=worker,
            device=runtime.device,
            model=outcome.version.ref,
            queue_ms=round((picked_at - job.submitted_at).total_seconds() * 1000.0, 3),
            run_ms=round((time.monotonic() - started) * 1000.0, 3),
        ),
    )


def _trainer(job: JobBase) -> Trainer:
    if isinstance(job, TrainJob):
        from workers.training.recommender import train_recommender

        return train_recommender
    from workers.training.finetune import fine_tune

    return fine_tune
