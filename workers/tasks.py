"""Celery tasks, kept thin: decode the job, hand it to the runtime, return JSON.

Inference jobs normally reach the runtime through the bulk ingest (``workers.ingest``);
these tasks serve them when the ingest is off (``CONVEYOR_INGEST=false``) and serve the
long jobs always. A task takes the job's JSON object as its one positional argument, or as
``job=``, or as plain keyword arguments. A job that does not validate fails at once with
InvalidJob naming the fields; it never reaches a batch.
"""

from __future__ import annotations

import time
from typing import Any, TypeVar

from celery import Task

from shared.errors import InvalidJob, JobCancelled, JobExpired, ModelNotFound
from shared.jobs import ClassifyJob, FineTuneJob, JobBase, RecommendJob, TrainJob, TranscribeJob
from shared.names import TASKS
from workers.app import app, process, runtime
from workers.ingest import job_data, validate_job

J = TypeVar("J", bound=JobBase)

# Expected failures: recorded as the job's error, logged without a traceback, never retried.
EXPECTED = (InvalidJob, ModelNotFound, JobExpired, JobCancelled)


def decode_job(model: type[J], task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> J:
    job = validate_job(model, dict(job_data(args, kwargs)), task.request.id)
    assert isinstance(job, model)
    return job


def _run(model: type[JobBase], task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    job = decode_job(model, task, args, kwargs)
    rt = runtime()
    rt.worker = str(task.request.hostname or process.hostname)
    return rt.run(job)


@app.task(name=TASKS["classify"], bind=True, throws=EXPECTED)
def classify(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return _run(ClassifyJob, self, args, kwargs)


@app.task(name=TASKS["transcribe"], bind=True, throws=EXPECTED)
def transcribe(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return _run(TranscribeJob, self, args, kwargs)


@app.task(name=TASKS["recommend"], bind=True, throws=EXPECTED)
def recommend(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return _run(RecommendJob, self, args, kwargs)


def _long(
    task: Task, model: type[TrainJob] | type[FineTuneJob], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    from workers.long_jobs import run_long_job

    started = time.monotonic()
    job = decode_job(model, task, args, kwargs)
    queue_s = max(0.0, time.time() - job.submitted_at.timestamp())
    state = "FAILURE"
    try:
        result = run_long_job(task, job, runtime(), str(task.request.hostname or "unknown")).model_dump(mode="json")
        state = "SUCCESS"
        return result
    except JobCancelled:
        state = "REVOKED"
        raise
    finally:
        if process.metrics is not None:  # long jobs are counted beside the inference ones
            process.metrics.job(job.type, state, queue_s, time.monotonic() - started)


@app.task(name=TASKS["train"], bind=True, throws=EXPECTED, track_started=True)
def train(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return _long(self, TrainJob, args, kwargs)


@app.task(name=TASKS["fine-tune"], bind=True, throws=EXPECTED, track_started=True)
def fine_tune(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return _long(self, FineTuneJob, args, kwargs)
