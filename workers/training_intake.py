"""Training messages pass the same intake as inference ones before Celery sees them.

Celery's own consumer trusts the bytes on its queue: a message that is not UTF-8 or not JSON
is lost inside kombu's read, an odd ``headers`` or ``embed`` reaches Celery's request code,
and a canvas ``embed`` would run callbacks a producer chose. So a training worker's Celery
consumer never reads ``conveyor.training`` itself: the ingest takes one message at a time,
only while this worker's Celery side is idle (so jobs spread over the training workers), files
it restorably or dead-letters it, validates the job like any other, and hands a *rebuilt*
message (Celery's own ``send_task``: the validated job, its id, nothing else) to the worker's
private queue, where Celery runs it with progress, revokes, events and its result as usual.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from celery import Celery

from shared.errors import TransientError
from shared.jobs import JobBase
from shared.names import TASKS
from workers.ingest import HANDED_OFF

log = logging.getLogger(__name__)

# After a hand-off, Celery's consumer needs a moment to reserve the message: until it shows as
# reserved (or this long has passed) the worker counts as busy, so it never takes two at once.
HANDOFF_SETTLE_S = 2.0


class CeleryHandoff:
    """The ingest's runtime for training workers: each admitted job is sent to this worker's
    own queue through Celery's ``send_task`` and acknowledged here."""

    def __init__(self, app: Celery, direct_queue: str, busy: Callable[[], bool]) -> None:
        self.app = app
        self.direct_queue = direct_queue
        self._busy = busy
        self._handed_at = 0.0

    def idle(self) -> bool:
        """True when this worker can take the next training job."""
        if self._busy():
            self._handed_at = 0.0  # Celery has it: from now its own state says when it is done
            return False
        return time.monotonic() - self._handed_at > HANDOFF_SETTLE_S

    def submit(
        self,
        jobs: Sequence[JobBase],
        done: Callable[[JobBase, Any], None],
        urgency: Callable[[JobBase], float] | None = None,
    ) -> None:
        for job in jobs:
            try:
                self.app.send_task(
                    TASKS[job.type], args=[job.model_dump(mode="json")], task_id=job.id, queue=self.direct_queue,
                    routing_key=self.direct_queue,
                )  # fmt: skip
            except Exception as exc:  # Redis away: retried by the ingest with backoff
                log.warning("could not hand training job %s to Celery: %s", job.id, exc)
                done(job, TransientError(f"could not hand the job to Celery: {type(exc).__name__}"))
                continue
            self._handed_at = time.monotonic()
            done(job, HANDED_OFF)

    def cancel(self, job: JobBase) -> None:
        """Nothing to cancel here: once handed off, Celery's revoke and the cancel key apply."""
