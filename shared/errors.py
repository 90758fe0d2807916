"""Error kinds, in one place, importable by producers and workers alike.

They cross the wire through Celery's JSON result backend as
``{"exc_type", "exc_message", "exc_module": "shared.errors"}``; a producer that has
``shared`` installed gets the same class back, any other client gets the type name and
message.

- ``InvalidJob``: the job itself is wrong. Never retried.
- ``ModelNotFound``: a model name that the store does not hold. Never retried.
- ``JobExpired`` / ``JobCancelled``: the job's deadline passed or a user cancelled it.
- ``TransientError``: worth another try (device out of memory, lost connection).
- ``IdempotencyConflict`` / ``DuplicateJob`` / ``QueueFull`` / ``QuotaExceeded``: refused at submit,
  nothing queued.
Anything else is an unexpected failure: recorded with its message, not retried.
"""

from __future__ import annotations


class ConveyorError(Exception):
    """Base of every error Conveyor raises on purpose."""

    retryable = False


class InvalidJob(ConveyorError, ValueError):
    """The job (or one of its inputs) is malformed; the message says which field and why."""


class ModelNotFound(ConveyorError, LookupError):
    """No model by that name in the model store; the message lists what exists."""


class JobExpired(ConveyorError):
    """The job's deadline passed before a worker could run it."""


class JobCancelled(ConveyorError):
    """A user cancelled the job."""


class TransientError(ConveyorError):
    """A failure that may not happen again (out of memory, a lost connection)."""

    retryable = True


class IdempotencyConflict(ConveyorError):
    """Raised at submit: the idempotency key is already held by a job with a different payload."""


class DuplicateJob(ConveyorError):
    """Raised at submit: a job with this explicit id was already submitted (while results are kept)."""


class QueueFull(ConveyorError):
    """Raised at submit: the queue holds more jobs than CONVEYOR_MAX_QUEUE_DEPTH; try again later."""

    retryable = True


class QuotaExceeded(ConveyorError):
    """Raised at submit: the tenant would pass one of its quotas (jobs queued, jobs a second);
    nothing was queued. ``retry_after_s``: when a retry may pass (the gateway's Retry-After)."""

    retryable = True

    def __init__(self, message: str, tenant: str = "", retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.tenant = tenant
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[object, ...]:  # pickled across processes with its fields
        return (type(self), (str(self), self.tenant, self.retry_after_s))


class JobFailed(ConveyorError):
    """Raised on the producer side by ``JobHandle.result`` when the job failed."""

    def __init__(self, job_id: str, error_type: str, message: str) -> None:
        super().__init__(f"job {job_id} failed: {error_type}: {message}")
        self.job_id = job_id
        self.error_type = error_type
        self.message = message


def describe_validation_error(exc: Exception) -> str:
    """One line per problem, naming the field: pydantic's errors, made readable."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    lines = []
    for err in errors():
        where = ".".join(str(p) for p in err.get("loc", ())) or "job"
        lines.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(lines)


class NotReplicated(ConveyorError):
    """Raised at submit with CONVEYOR_WAIT_REPLICAS: the master acknowledged the jobs but fewer replicas
    than asked confirmed them in time; they are queued, and may run, unless a failover loses them."""

    retryable = True
