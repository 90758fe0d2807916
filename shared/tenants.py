"""Tenants: one team's share of a Conveyor. A tenant's job ids start with ``TENANT:`` so Redis ACL
key patterns (``~celery-task-meta-TENANT:*`` and the like) can confine each producer to its own
results without trusting the client. One home for the rule; producers, the gateway and workers read it."""

from __future__ import annotations

import re
import uuid

TENANT_SEPARATOR = ":"
TENANT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")


def check_tenant(tenant: str) -> str:
    """``tenant`` if it is a valid tenant name (lower-case letters, digits, ``_`` and ``-``, at most 32)."""
    if not TENANT_PATTERN.fullmatch(tenant):
        raise ValueError(
            f"a tenant name is 1-32 of a-z, 0-9, '_' and '-', starting with a letter or digit, not {tenant!r}"
        )
    return tenant


def tenant_prefix(tenant: str) -> str:
    return check_tenant(tenant) + TENANT_SEPARATOR


def new_job_id(tenant: str | None = None) -> str:
    """A fresh job id, carrying the tenant's prefix when there is one."""
    return (tenant_prefix(tenant) if tenant else "") + str(uuid.uuid4())


def tenant_of(job_id: str) -> str | None:
    """The tenant a job id names, or None for an id without a (valid) tenant prefix."""
    head, sep, _ = job_id.partition(TENANT_SEPARATOR)
    return head if sep and TENANT_PATTERN.fullmatch(head) else None
