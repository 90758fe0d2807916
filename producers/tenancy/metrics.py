"""Per-tenant figures for Prometheus, labelled ``tenant``: bounded, as tenants are the ones an admin
made (``conveyor:tenants``, written by `conveyor users add --tenant` and `users quota`), at most
``MAX_TENANTS`` of them.

- ``conveyor_tenant_queued_jobs{tenant}``: submitted and not yet taken by a worker (the quota's count)
- ``conveyor_tenant_quota_max_queued{tenant}``, ``conveyor_tenant_quota_max_jobs_per_s{tenant}``
- ``conveyor_tenant_quota_refused_total{tenant}``: jobs refused with QuotaExceeded

One pipelined round trip a scrape. Register it beside the exporter's own collector:
``registry.register(TenantCollector(client, settings))``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from producers.tenancy.gate import QUOTA_FIELDS, read_quota
from shared.settings import Settings
from shared.tenant_keys import TENANTS_KEY, queued_key, quota_key, refused_key
from shared.tenants import TENANT_PATTERN

MAX_TENANTS: Final = 1000  # label values a scrape may carry; more tenants are left out (and counted)


class TenantCollector:
    def __init__(self, client: redis.Redis, settings: Settings | None = None) -> None:
        self.client = client
        self.settings = settings or Settings()

    def tenants(self) -> list[str]:
        raw = self.client.smembers(TENANTS_KEY)
        names = sorted(n.decode() if isinstance(n, bytes) else str(n) for n in raw)
        return [n for n in names if TENANT_PATTERN.fullmatch(n)][:MAX_TENANTS]

    def collect(self) -> Iterator[Metric]:
        tenants = self.tenants()
        pipe = self.client.pipeline(transaction=False)
        for tenant in tenants:
            pipe.zcard(queued_key(tenant))
            pipe.hmget(quota_key(tenant), list(QUOTA_FIELDS))
            pipe.get(refused_key(tenant))
        replies = pipe.execute() if tenants else []
        queued = GaugeMetricFamily(
            "conveyor_tenant_queued_jobs", "Jobs a tenant submitted, not yet taken.", labels=["tenant"]
        )
        max_queued = GaugeMetricFamily(
            "conveyor_tenant_quota_max_queued", "A tenant's quota of queued jobs.", labels=["tenant"]
        )
        max_rate = GaugeMetricFamily(
            "conveyor_tenant_quota_max_jobs_per_s", "A tenant's quota of jobs a second.", labels=["tenant"]
        )
        refused = CounterMetricFamily(
            "conveyor_tenant_quota_refused", "Jobs refused at submit by a tenant's quotas.", labels=["tenant"]
        )
        for i, tenant in enumerate(tenants):
            count, fields, refusals = replies[3 * i : 3 * i + 3]
            quota = read_quota(fields, self.settings)
            queued.add_metric([tenant], float(count))
            max_queued.add_metric([tenant], float(quota.max_queued))
            max_rate.add_metric([tenant], float(quota.max_jobs_per_s))
            refused.add_metric([tenant], float(int(refusals or 0)))
        yield from (queued, max_queued, max_rate, refused)
