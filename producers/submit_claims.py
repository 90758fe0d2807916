"""What a submit claims in Redis before it sends anything: each job's idempotency key and,
for a job whose producer chose its id, the id itself.

- Idempotency key -> ``"JOB_ID:SHA256"`` (the hash of the job's payload, envelope left out).
  A second submit with the key and the same payload gets the first job back; with another
  payload it is refused (``IdempotencyConflict``): a key names one piece of work. A key
  holding a bare id (written before hashes were stored) matches any payload.
- Explicit job id -> ``conveyor:job:ID`` (SET NX, kept as long as results). A second submit
  of the same id is refused (``DuplicateJob``) instead of running the job twice. A generated
  id (uuid4) needs no claim, but is recorded under the same key (one pipelined round trip for
  the whole call), so ``Client.exists`` knows a queued job from an id nobody submitted; a
  tenant's job is known by its submit claim instead.

Claims are all-or-nothing per call: on a refusal, or when sending fails, the claims this call
made are released (only where they still hold this call's value), so a retry starts clean.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final

import redis

from shared.errors import DuplicateJob, IdempotencyConflict
from shared.jobs import JobBase
from shared.names import IDEMPOTENCY_KEY_PREFIX, JOB_ID_KEY_PREFIX
from shared.settings import Settings
from shared.tenants import tenant_of

# The envelope may differ between two submits of the same work (a fresh id and time, a
# retry at another priority); the hash covers the rest.
ENVELOPE_FIELDS: Final = frozenset({"id", "submitted_at", "idempotency_key", "deadline", "priority", "schema_version"})
_KEY_VALUE = re.compile(r"(?s)(.+):([0-9a-f]{64})")


def payload_hash(job: JobBase) -> str:
    payload = job.model_dump(mode="json", exclude=set(ENVELOPE_FIELDS))
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def parse_key_value(value: str) -> tuple[str, str | None]:
    """``"ID:HASH"`` -> (ID, HASH); a bare ``"ID"`` (older producers) -> (ID, None)."""
    match = _KEY_VALUE.fullmatch(value)
    return (match[1], match[2]) if match else (value, None)


def explicit_id(job: JobBase) -> bool:
    return "id" in job.model_fields_set


class SubmitClaims:
    """The claims of one ``submit_many`` call."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self._made: dict[str, list[tuple[str, str]]] = {}  # job id -> (key, value) this call wrote

    def claim_all(self, jobs: Sequence[JobBase]) -> list[str | None]:
        """Per job: None to send it, or the id of the earlier job its idempotency key names.
        Raises IdempotencyConflict or DuplicateJob having released every claim of this call."""
        found: list[str | None] = []
        try:
            for job in jobs:
                existing = self._claim_key(job) if job.idempotency_key is not None else None
                if existing is None and explicit_id(job):
                    self._claim_id(job)
                found.append(existing)
            self._record_generated([job for job, earlier in zip(jobs, found) if earlier is None])
        except (IdempotencyConflict, DuplicateJob, redis.RedisError):
            self.release()
            raise
        return found

    def _record_generated(self, jobs: Sequence[JobBase]) -> None:
        # A tenant's job has its submit claim instead (producers/tenancy/gate.py), which exists() reads.
        fresh = [job for job in jobs if not explicit_id(job) and tenant_of(job.id) is None]
        if not fresh:
            return
        value = datetime.now(UTC).isoformat()
        pipe = self.redis.pipeline(transaction=False)
        for job in fresh:
            pipe.set(JOB_ID_KEY_PREFIX + job.id, value, ex=self.settings.result_ttl_s)
        pipe.execute()
        for job in fresh:
            self._made.setdefault(job.id, []).append((JOB_ID_KEY_PREFIX + job.id, value))

    def release(self, keep: Sequence[str] = ()) -> None:
        """Undo the claims of jobs not in ``keep`` (the ids that were sent)."""
        kept = set(keep)
        undo = [claim for job_id, claims in self._made.items() if job_id not in kept for claim in claims]
        if not undo:
            return
        for key, value in undo:
            self._release_one(key, value)
        self._made = {job_id: claims for job_id, claims in self._made.items() if job_id in kept}

    def _release_one(self, key: str, value: str) -> None:
        """Delete ``key`` only if it still holds this call's value (it may have expired and been
        claimed again); WATCH, not Lua, as some Redis deployments disable scripting."""

        def delete_if_ours(pipe: redis.client.Pipeline) -> None:
            if pipe.get(key) == value.encode():
                pipe.multi()
                pipe.delete(key)

        self.redis.transaction(delete_if_ours, key)

    def _claim_key(self, job: JobBase) -> str | None:
        assert job.idempotency_key is not None
        key = IDEMPOTENCY_KEY_PREFIX + job.idempotency_key
        digest = payload_hash(job)
        value = f"{job.id}:{digest}"
        for _ in range(3):  # the key may expire between the SET and the GET
            if self.redis.set(key, value, nx=True, ex=self.settings.idempotency_ttl_s):
                self._made.setdefault(job.id, []).append((key, value))
                return None
            held = self.redis.get(key)
            if held is None:
                continue
            first_id, first_digest = parse_key_value(held if isinstance(held, str) else held.decode())
            if first_digest is not None and first_digest != digest:
                raise IdempotencyConflict(
                    f"idempotency_key {job.idempotency_key!r} already names job {first_id}, submitted with a "
                    f"different payload; a different job needs a new key (keys are kept "
                    f"{self.settings.idempotency_ttl_s} s)"
                )
            return first_id
        raise redis.RedisError(f"idempotency_key {job.idempotency_key!r} could not be claimed")

    def _claim_id(self, job: JobBase) -> None:
        key = JOB_ID_KEY_PREFIX + job.id
        value = datetime.now(UTC).isoformat()
        if not self.redis.set(key, value, nx=True, ex=self.settings.result_ttl_s):
            raise DuplicateJob(
                f"job id {job.id!r} was already submitted; a new job needs a new id (or none: one is "
                "generated), and an idempotency_key makes a resubmit return the first job"
            )
        self._made.setdefault(job.id, []).append((key, value))
