"""What a record in Celery's Redis result backend (``celery-task-meta-ID``) says about a job,
read the same way by the sync and the async SDK: its state, progress, error, and the typed
result once it is done.

Celery writes the record (and PUBLISHes it on a channel of the same name) when a job starts
(long jobs only), reports progress, and finishes. A queued job has no record, and neither has
an id nobody submitted: both read PENDING. ``exists()`` tells them apart (see
``producers.submit_claims``: every job the SDK sends is recorded at submit).
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from celery import states
from pydantic import BaseModel, ValidationError

from shared.errors import JobFailed, describe_validation_error
from shared.kinds import RESULT_MODELS
from shared.results import Progress

Meta = dict[str, Any]  # a decoded record: status, result (an exception for FAILURE), ...


@dataclass(frozen=True)
class JobStatus:
    id: str
    state: str  # PENDING (queued or unknown), STARTED, PROGRESS, SUCCESS, FAILURE, REVOKED, RETRY
    progress: Progress | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.state in ("SUCCESS", "FAILURE", "REVOKED")


class Untyped(BaseModel, extra="allow"):
    """A result of a kind this SDK has no model for: its fields as sent."""


class BadResult(Exception):
    """A result record that is not Celery's JSON (written by something else): the job counts as failed."""


def decode(backend: Any, raw: bytes | str) -> Meta:
    """A record as Celery's backend reads it (a FAILURE's result becomes its exception); one that
    does not decode is a FAILURE, so nobody waits on it for ever."""
    try:
        meta = backend.decode_result(raw)
    except Exception as exc:
        return {"status": states.FAILURE, "result": BadResult(f"unreadable result record: {type(exc).__name__}")}
    if not isinstance(meta, dict):
        return {"status": states.FAILURE, "result": BadResult("the result record is not a JSON object")}
    return meta


def is_ready(meta: Meta | None) -> bool:
    status = None if meta is None else meta.get("status")
    return isinstance(status, str) and status in states.READY_STATES


def status_of(job_id: str, state: str, info: Any) -> JobStatus:
    progress = None
    if state == "PROGRESS" and isinstance(info, dict):
        with suppress(ValidationError):  # a record someone else wrote: the state still tells
            progress = Progress.model_validate(info)
    error = f"{type(info).__name__}: {info}" if state in ("FAILURE", "REVOKED") and info is not None else None
    return JobStatus(job_id, state, progress, error)


def status_from_meta(job_id: str, meta: Meta | None) -> JobStatus:
    if meta is None:
        return JobStatus(job_id, states.PENDING)
    return status_of(job_id, str(meta.get("status", states.PENDING)), meta.get("result"))


def result_json(job_id: str, state: str, value: Any) -> dict[str, Any]:
    """The raw result object of a finished job; raises JobFailed (the worker's error type and message)."""
    if state != states.SUCCESS:
        raise JobFailed(job_id, type(value).__name__ if value is not None else state, str(value))
    if not isinstance(value, dict):
        raise JobFailed(job_id, "BadResult", f"expected a JSON object, got {value!r}")
    return value


def typed(value: dict[str, Any], job_type: str | None, job_id: str = "?") -> BaseModel:
    """ClassifyResult, TranscribeResult, ... by the result's own ``type``; a result that does not
    fit its model raises JobFailed (BadResult) naming the fields."""
    model = RESULT_MODELS.get(str(value.get("type", job_type)))
    try:
        return model.model_validate(value) if model else Untyped.model_validate(value)
    except ValidationError as exc:
        raise JobFailed(job_id, "BadResult", describe_validation_error(exc)) from None


def outcome(job_id: str, job_type: str | None, meta: Meta) -> BaseModel | JobFailed:
    """A finished job's typed result, or the JobFailed its result raises."""
    try:
        return typed(result_json(job_id, str(meta.get("status")), meta.get("result")), job_type, job_id)
    except JobFailed as failed:
        return failed
