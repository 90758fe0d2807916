"""A tenant's side of a submit: its prefix on every job, its quotas, and its submit claims.

``TenantGate.stamp`` gives a job the tenant's prefix (``T:<uuid>`` ids, ``T:`` idempotency keys,
shared/tenants.py), so the keys the submit writes fall under the tenant's ACL patterns.
``TenantGate.admit`` then does, in one pipelined round trip:

- reads the tenant's quotas (``conveyor:quota:T``, else the CONVEYOR_TENANT_* defaults);
- counts its queued jobs (a sorted set workers remove from at intake) and adds this call's;
- counts this second's submits (a per-second counter, INCRBY);
- writes each job's submit claim (``conveyor:claim:<id>`` -> the job's digest), which workers
  require of every tenant's job (workers/tenancy.py): the proof, checked by Redis's ACL, that
  tenant T's producer sent it.

Over a quota, everything this call wrote is taken back and ``QuotaExceeded`` names the quota
and when to retry (``retry_after_s``, the gateway's Retry-After). Like ``CONVEYOR_MAX_QUEUE_DEPTH``
the bounds are soft by what other producers of the same tenant send in the same instant.
Plain commands only (no Lua, no DEL, no EXPIRE): the producer role grants no more.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from shared.errors import QuotaExceeded
from shared.jobs import MAX_ID_CHARS, MAX_KEY_CHARS, JobBase
from shared.settings import Settings
from shared.tenant_keys import RATE_WINDOW_TTL_S, claim_key, job_digest, queued_key, quota_key, rate_key, refused_key
from shared.tenants import check_tenant, tenant_of, tenant_prefix

QUOTA_FIELDS = ("max_queued", "max_jobs_per_s")
# A queued-jobs refusal cannot know when workers will take some: ask again after this long.
QUEUED_RETRY_AFTER_S = 1.0


@dataclass(frozen=True)
class Quota:
    max_queued: int
    max_jobs_per_s: int


def read_quota(raw: Sequence[bytes | str | None], settings: Settings) -> Quota:
    """The tenant's quota from its hash's fields (a field unset or unreadable takes the default)."""

    def number(value: bytes | str | None, default: int) -> int:
        try:
            return max(1, int(value)) if value is not None else default
        except ValueError:
            return default

    return Quota(
        number(raw[0] if raw else None, settings.tenant_max_queued),
        number(raw[1] if len(raw) > 1 else None, settings.tenant_max_jobs_per_s),
    )


class TenantGate:
    def __init__(
        self,
        client: Callable[[], redis.Redis],
        tenant: str,
        settings: Settings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client  # called lazily: a Client builds its connection on first use
        self.tenant = check_tenant(tenant)
        self.prefix = tenant_prefix(tenant)
        self.settings = settings
        self._clock = clock

    def stamp(self, job: JobBase) -> JobBase:
        """``job`` with the tenant's prefix on its id and idempotency key (added where missing).
        An id that names another tenant is refused: this producer may not submit for it."""
        update: dict[str, str] = {}
        owner = tenant_of(job.id)
        explicit = "id" in job.model_fields_set
        if owner is not None and owner != self.tenant:
            raise ValueError(
                f"job id {job.id!r} belongs to tenant {owner!r}; this producer submits for {self.tenant!r}"
            )
        if owner is None:
            update["id"] = self.prefix + job.id
        key = job.idempotency_key
        if key is not None and not key.startswith(self.prefix):
            update["idempotency_key"] = self.prefix + key
        if not update:
            return job
        if len(update.get("id", "")) > MAX_ID_CHARS or len(update.get("idempotency_key", "")) > MAX_KEY_CHARS:
            raise ValueError(f"job {job.id!r}: with the prefix {self.prefix!r} its id or idempotency key is too long")
        stamped = job.model_copy(update=update)  # the prefix keeps an id valid (checked: shared.jobs)
        if not explicit:  # still a generated id: no id claim (producers.submit_claims) is needed
            stamped.__pydantic_fields_set__.discard("id")
        return stamped

    def admit(self, jobs: Sequence[JobBase]) -> None:
        """Check the quotas for ``jobs`` and write their claims, in one round trip; raise
        QuotaExceeded, having taken back what this call wrote, when a quota would be passed."""
        if not jobs:
            return
        now = self._clock()
        second = int(now)
        ids = [job.id for job in jobs]
        ttl = self.settings.result_ttl_s
        pipe = self._client().pipeline(transaction=False)
        pipe.hmget(quota_key(self.tenant), list(QUOTA_FIELDS))
        pipe.zremrangebyscore(queued_key(self.tenant), "-inf", now - ttl)  # members a lost job left behind
        pipe.zcard(queued_key(self.tenant))
        pipe.set(rate_key(self.tenant, second), 0, ex=RATE_WINDOW_TTL_S, nx=True)
        pipe.incrby(rate_key(self.tenant, second), len(jobs))
        for job in jobs:
            pipe.set(claim_key(job.id), job_digest(job.model_dump(mode="json")), ex=ttl)
        pipe.zadd(queued_key(self.tenant), dict.fromkeys(ids, now))
        replies = pipe.execute()
        quota = read_quota(replies[0], self.settings)
        queued_before, this_second = int(replies[2]), int(replies[4])
        refusal = self._refusal(quota, len(jobs), queued_before, this_second, now)
        if refusal is not None:
            self._undo(ids, second, len(jobs), refused=True)
            raise refusal

    def _refusal(self, quota: Quota, n: int, queued: int, this_second: int, now: float) -> QuotaExceeded | None:
        if n > quota.max_jobs_per_s or n > quota.max_queued:
            return QuotaExceeded(
                f"tenant {self.tenant!r}: {n} jobs in one submit pass its quota ({quota.max_queued} queued, "
                f"{quota.max_jobs_per_s} a second); submit fewer at a time",
                self.tenant,
                1.0,
            )
        if this_second > quota.max_jobs_per_s:
            wait = max(0.001, math.ceil(now) - now) if now != int(now) else 1.0
            return QuotaExceeded(
                f"tenant {self.tenant!r} passed its quota of {quota.max_jobs_per_s} jobs a second: "
                f"{n} refused; retry in {wait:.3f} s",
                self.tenant,
                wait,
            )
        if queued + n > quota.max_queued:
            return QuotaExceeded(
                f"tenant {self.tenant!r} has {queued} jobs queued, at most {quota.max_queued} allowed: "
                f"{n} more refused; retry once workers take some",
                self.tenant,
                QUEUED_RETRY_AFTER_S,
            )
        return None

    def release(self, ids: Sequence[str]) -> None:
        """Take back the claims and queued entries of jobs that were not sent after all."""
        if ids:
            self._undo(list(ids), None, 0)

    def _undo(self, ids: list[str], second: int | None, n: int, refused: bool = False) -> None:
        pipe = self._client().pipeline(transaction=False)
        if second is not None and n:
            pipe.decrby(rate_key(self.tenant, second), n)  # a refused job is not counted
        if refused:
            pipe.incrby(refused_key(self.tenant), len(ids))  # ... but shown (producers/tenancy/metrics.py)
        pipe.zrem(queued_key(self.tenant), *ids)
        for job_id in ids:
            pipe.getdel(claim_key(job_id))  # GETDEL: a string command, so the role needs no DEL
        pipe.execute()
