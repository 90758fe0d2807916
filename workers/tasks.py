"""Celery tasks, kept thin: decode the job, hand it to the runtime, return JSON.

A task takes the job's JSON object as its one positional argument, or as ``job=``, or as
plain keyword arguments (so any Celery-speaking client can call it). A job that does not
validate fails at once with InvalidJob naming the fields; it never reaches a batch.
"""

from __future__ import annotations

from typing import Any, TypeVar

from celery import Task
from pydantic import ValidationError

from shared.errors import InvalidJob, JobCancelled, JobExpired, ModelNotFound, describe_validation_error
from shared.jobs import ClassifyJob, FineTuneJob, JobBase, RecommendJob, TrainJob, TranscribeJob
from shared.names import TASKS
from workers.app import app, runtime

J = TypeVar("J", bound=JobBase)

# Expected failures: recorded as the job's error, logged without a traceback, never retried.
EXPECTED = (InvalidJob, ModelNotFound, JobExpired, JobCancelled)


def decode_job(model: type[J], task: Task, args: tuple[Any, ...], kwargs: dict[str, Any]) -> J:
    if args:
        if len(args) != 1 or kwargs:
            raise InvalidJob("send the job as one JSON object (one positional argument, or job=...)")
        data = args[0]
    elif set(kwargs) == {"job"}:
        data = kwargs["job"]
    else:
        data = kwargs
    if not isinstance(data, dict):
        raise InvalidJob(f"the job must be a JSON object, got {type(data).__name__}")
    data = dict(data)
    data.setdefault("id", task.request.id)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidJob(f"invalid {model.__name__}: {describe_validation_error(exc)}") from None


def _worker_name(task: Task) -> str:
    return str(task.request.hostname or "unknown")


@app.task(name=TASKS["classify"], bind=True, throws=EXPECTED)
def classify(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    job = decode_job(ClassifyJob, self, args, kwargs)
    return runtime().classify(job, _worker_name(self)).model_dump(mode="json")


@app.task(name=TASKS["transcribe"], bind=True, throws=EXPECTED)
def transcribe(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    job = decode_job(TranscribeJob, self, args, kwargs)
    return runtime().transcribe(job, _worker_name(self)).model_dump(mode="json")


@app.task(name=TASKS["recommend"], bind=True, throws=EXPECTED)
def recommend(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    job = decode_job(RecommendJob, self, args, kwargs)
    return runtime().recommend(job, _worker_name(self)).model_dump(mode="json")


@app.task(name=TASKS["train"], bind=True, throws=EXPECTED, track_started=True)
def train(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    from workers.long_jobs import run_long_job

    job = decode_job(TrainJob, self, args, kwargs)
    return run_long_job(self, job, runtime(), _worker_name(self)).model_dump(mode="json")


@app.task(name=TASKS["fine-tune"], bind=True, throws=EXPECTED, track_started=True)
def fine_tune(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    from workers.long_jobs import run_long_job

    job = decode_job(FineTuneJob, self, args, kwargs)
    return run_long_job(self, job, runtime(), _worker_name(self)).model_dump(mode="json")
