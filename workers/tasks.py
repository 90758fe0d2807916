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
from shared.jobs import JobBase
from shared.kinds import KINDS, KindSpec
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


def _long(task: Task, model: type[JobBase], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
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


def _register(spec: KindSpec) -> Task:
    """One Celery task per registered kind, by its name: inference kinds through the runtime
    (when the ingest is off), training kinds on Celery's path with progress."""
    model = spec.job
    if spec.inference:

        def run(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
            return _run(model, self, args, kwargs)

        options: dict[str, Any] = {}
    else:

        def run(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
            return _long(self, model, args, kwargs)

        options = {"track_started": True}
    run.__name__ = run.__qualname__ = spec.name.replace("-", "_")
    task: Task = app.task(name=spec.task, bind=True, throws=EXPECTED, **options)(run)
    return task


CELERY_TASKS: dict[str, Task] = {name: _register(spec) for name, spec in KINDS.items()}
