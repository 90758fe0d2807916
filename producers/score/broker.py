"""The bulk run's side of Redis: publish chunks to the bulk queue, collect finished ones,
and tell a chunk that is still queued or running from one that Redis lost.

Results are read with one MGET per poll for every chunk in flight (Celery's per-task
``get`` would wait on one at a time) and deleted once the run has them on disk, so a
million-row run leaves nothing behind in Redis.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.jobs import JobBase
from shared.names import BULK_QUEUES, priority_lists

if TYPE_CHECKING:
    from producers.client import Client

UNACKED_KEY = "unacked"  # kombu's hash of delivered, not yet acknowledged messages


@dataclass(frozen=True)
class ChunkOutcome:
    job_id: str
    ok: bool
    result: dict[str, Any] | None = None
    error_type: str | None = None
    error: str | None = None


class ChunkBroker:
    def __init__(self, client: Client, job_type: str) -> None:
        self.client = client
        self.queue = BULK_QUEUES[job_type]
        self.backend = client.app.backend

    def publish(self, job: JobBase) -> None:
        self.client.submit_many([job], queue=self.queue)

    def poll(self, job_ids: list[str]) -> list[ChunkOutcome]:
        """The jobs among ``job_ids`` that have finished, successfully or not."""
        if not job_ids:
            return []
        keys = [self.backend.get_key_for_task(job_id) for job_id in job_ids]
        outcomes = []
        for job_id, raw in zip(job_ids, self.backend.client.mget(keys)):
            if raw is None:
                continue
            meta = self.backend.decode_result(raw)
            status = meta.get("status")
            if status == "SUCCESS":
                value = meta.get("result")
                if isinstance(value, dict):
                    outcomes.append(ChunkOutcome(job_id, True, value))
                else:
                    outcomes.append(
                        ChunkOutcome(job_id, False, error_type="BadResult", error=f"not a JSON object: {value!r}")
                    )
            elif status in ("FAILURE", "REVOKED"):
                error_type, message = _failure(meta.get("result"))
                outcomes.append(ChunkOutcome(job_id, False, error_type=error_type or status, error=message))
        return outcomes

    def forget(self, job_ids: list[str]) -> None:
        if job_ids:
            self.backend.client.delete(*[self.backend.get_key_for_task(job_id) for job_id in job_ids])

    def waiting(self, job_prefix: str) -> set[str]:
        """Ids starting with ``job_prefix`` that sit in the bulk queue or in a worker's hands.

        A chunk whose id is neither here nor has a result is lost (Redis restarted without
        its data, or the result expired) and must be sent again.
        """
        pattern = re.compile(re.escape(job_prefix).encode() + rb"[0-9]+(?:-r[0-9]+)?")
        redis = self.client.redis
        names = priority_lists(self.queue)
        found: set[str] = set()
        for name in names:
            for message in redis.lrange(name, 0, -1):
                found.update(m.decode() for m in pattern.findall(_bytes(message)))
        for _, message in redis.hscan_iter(UNACKED_KEY):
            found.update(m.decode() for m in pattern.findall(_bytes(message)))
        return found


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _failure(value: Any) -> tuple[str | None, str]:
    """(error type, message) of a failed job's result: Celery's decoder rebuilds the exception."""
    if isinstance(value, BaseException):
        return type(value).__name__, " ".join(str(a) for a in value.args) if value.args else str(value)
    if isinstance(value, dict):
        message = value.get("exc_message", "")
        if isinstance(message, (list, tuple)):
            message = " ".join(str(m) for m in message)
        return value.get("exc_type"), str(message)
    return None, str(value)
