"""The Redis keys of tenancy, in one place (producers write them, workers read them, the ACL roles
in producers/tenancy/roles.py grant them by these prefixes).

- ``conveyor:claim:T:<uuid>`` -> the job's digest: a tenant's *submit claim*. Written by the
  producer before it publishes the job; only a user whose ACL allows ``~conveyor:claim:T:*`` can
  write it, so a worker that finds it knows tenant T's producer sent this very job (the digest
  binds the claim to the job's JSON). Kept as long as results (``CONVEYOR_RESULT_TTL_S``).
- ``conveyor:quota:T`` (hash): the tenant's limits, ``max_queued`` and ``max_jobs_per_s``, set by
  an admin (`conveyor users quota`); a field left out takes the CONVEYOR_TENANT_* default.
- ``conveyor:quota:T:queued`` (sorted set): the tenant's jobs submitted and not yet taken by a
  worker, scored by submit time. Producers ZADD, workers ZREM at intake (idempotent, so a
  redelivery cannot count twice); members older than the claims' lifetime are pruned.
- ``conveyor:quota:T:rate:<unix second>``: jobs the tenant submitted in that second.
- ``conveyor:quota:T:refused``: jobs refused by the tenant's quotas (a counter, for metrics).
- ``conveyor:tenants`` (set): the tenants an admin made (`conveyor users`): the bounded label values
  of per-tenant metrics (producers/tenancy/metrics.py).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Final

from shared.tenants import tenant_prefix

CLAIM_KEY_PREFIX: Final = "conveyor:claim:"
QUOTA_KEY_PREFIX: Final = "conveyor:quota:"
TENANTS_KEY: Final = "conveyor:tenants"
RATE_WINDOW_TTL_S: Final = 2  # a per-second counter outlives its second by one


def claim_key(job_id: str) -> str:
    return CLAIM_KEY_PREFIX + job_id


def quota_key(tenant: str) -> str:
    return QUOTA_KEY_PREFIX + tenant_prefix(tenant).rstrip(":")


def queued_key(tenant: str) -> str:
    return quota_key(tenant) + ":queued"


def rate_key(tenant: str, second: int) -> str:
    return f"{quota_key(tenant)}:rate:{second}"


def refused_key(tenant: str) -> str:
    return quota_key(tenant) + ":refused"


def job_digest(job_json: dict[str, Any]) -> str:
    """sha256 of the job's JSON object as sent (keys sorted, no spaces, ASCII escapes): the
    producer hashes what it publishes, the worker what it received, and the two must agree."""
    text = json.dumps(job_json, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()
