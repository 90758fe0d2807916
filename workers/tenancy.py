"""The worker's check of a tenant's job: its submit claim must be there and match.

A job whose id carries a tenant prefix (``T:...``, shared/tenants.py) runs only if
``conveyor:claim:T:...`` holds the digest of the job's JSON as received (shared/tenant_keys.py).
Only a Redis user whose ACL allows ``~conveyor:claim:T:*`` can write that key: tenant T's producers
(producers/tenancy/roles.py). The queues are shared by every tenant and Redis cannot look inside a
message, so this is what stops tenant A from publishing a job under tenant B's prefix (to read
its result, or to overwrite one of B's results): A cannot write B's claim. The digest binds the
claim to the job, so a claim cannot be reused for another payload under the same id.

A refused job is dead-lettered with the reason and gets no result: its id is not its sender's, and a
FAILURE written under it would overwrite the tenant's own job (the forger may know its id).

At the same time the job leaves its tenant's queued count (the quota, producers/tenancy/gate.py):
ZREM, idempotent, so a redelivery cannot count twice. Jobs without a tenant prefix cost nothing
(and, with CONVEYOR_REQUIRE_TENANT, are refused). A tenant job costs one round trip of its own
(~190 us on a local Redis), unless the ingest reads the batch's claims in its one lookup pipeline
(``queue_claim_lookups`` / ``claims_from``) and passes them in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from typing import Any

import redis

from shared.settings import Settings
from shared.tenant_keys import claim_key, job_digest, queued_key
from shared.tenants import tenant_of
from shared.wire_text import printable


@cache
def tenant_required() -> bool:
    """CONVEYOR_REQUIRE_TENANT, read once per worker process."""
    return Settings().require_tenant


def queue_claim_lookups(pipe: redis.client.Pipeline, job_ids: Iterable[str]) -> list[str]:
    """Add to ``pipe`` (the ingest's one lookup round trip) the claim reads of the tenant jobs among
    ``job_ids``, and their removal from their tenants' queued counts; returns those ids, in order.
    Their replies, two per id, go to ``claims_from``."""
    tenant_ids = [i for i in job_ids if tenant_of(i) is not None]
    for job_id in tenant_ids:
        pipe.get(claim_key(job_id))
        pipe.zrem(queued_key(tenant_of(job_id) or ""), job_id)
    return tenant_ids


def claims_from(tenant_ids: Sequence[str], replies: Sequence[Any]) -> dict[str, bytes | None]:
    """Job id -> its claim (or None), from ``queue_claim_lookups``' replies."""
    return {job_id: replies[2 * k] for k, job_id in enumerate(tenant_ids)}


def claim_refusal(
    client: redis.Redis, job_id: str, job_json: dict[str, Any], claims: Mapping[str, bytes | None] | None = None
) -> str | None:
    """Why the job may not run (no claim, or a claim for another payload; no tenant where one is
    required), or None. ``claims``: the batch's claims read beforehand (``queue_claim_lookups``);
    a job not among them is looked up here, in a round trip of its own."""
    tenant = tenant_of(job_id)
    if tenant is None:
        if tenant_required():
            shown = printable(job_id, 100)
            return f"job {shown!r} carries no tenant prefix (TENANT:...), and CONVEYOR_REQUIRE_TENANT is set"
        return None
    if claims is not None and job_id in claims:
        claim = claims[job_id]
    else:
        pipe = client.pipeline(transaction=False)
        claim = claims_from(queue_claim_lookups(pipe, [job_id]), pipe.execute())[job_id]
    return _refusal(job_id, tenant, claim, job_json)


def _refusal(job_id: str, tenant: str, claim: bytes | str | None, job_json: dict[str, Any]) -> str | None:
    shown = printable(job_id, 100)
    if claim is None:
        return (
            f"job {shown!r} carries tenant {tenant!r}'s prefix but has no submit claim ({claim_key('')}{shown}): "
            f"only a producer logged in as tenant {tenant!r} may submit it (README: Access control)"
        )
    try:
        digest = job_digest(job_json)
    except (TypeError, ValueError):
        digest = ""
    if (claim.decode(errors="replace") if isinstance(claim, bytes) else str(claim)) != digest:
        return f"job {shown!r} does not match its submit claim: its payload is not what tenant {tenant!r} submitted"
    return None
