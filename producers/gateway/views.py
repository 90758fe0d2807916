"""What the gateway answers: pydantic models (they are its OpenAPI response schemas), and a job's
view read through the SDK's ``JobHandle``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from producers.client import JobHandle
from shared.errors import JobFailed
from shared.results import Progress


class Accepted(BaseModel):
    """202: the job is queued."""

    id: str = Field(description="The job id (TENANT:<uuid>), also its Celery task id.")
    type: str
    status_url: str = Field(description="GET it for the job's state and result.")
    wait_url: str = Field(description="GET it to wait (long poll) for the result.")


class JobError(BaseModel):
    type: str = Field(description="InvalidJob, ModelNotFound, JobExpired, JobCancelled, ...")
    message: str


class JobView(BaseModel):
    """A job's state; ``result`` once it succeeded, ``error`` once it failed or was cancelled."""

    id: str
    state: str = Field(description="PENDING (queued, or unknown), STARTED, PROGRESS, SUCCESS, FAILURE, REVOKED")
    done: bool
    progress: Progress | None = None
    result: dict[str, Any] | None = None
    error: JobError | None = None


class Cancelled(BaseModel):
    id: str
    cancelled: bool = True


class Problem(BaseModel):
    """Every 4xx and 5xx: what is wrong, in words (``errors``: pydantic's list, for 422)."""

    detail: str
    errors: list[dict[str, Any]] | None = None


def job_view(handle: JobHandle) -> JobView:
    """One look at the job (blocking: call it off the event loop)."""
    status = handle.status()
    view = JobView(id=handle.id, state=status.state, done=status.done, progress=status.progress)
    if status.state == "SUCCESS":
        try:
            view.result = handle.result_json(timeout=5)
        except JobFailed as exc:  # a result that is not a JSON object
            view.error = JobError(type=exc.error_type, message=exc.message)
    elif status.done:
        try:
            handle.result_json(timeout=5)
        except JobFailed as exc:
            view.error = JobError(type=exc.error_type, message=exc.message)
    return view
