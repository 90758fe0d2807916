"""The numbers `conveyor status` prints: the exporter's own (same reads of Redis), for a person."""

from __future__ import annotations

from typing import Any

import redis

from producers.job_stats import read_totals
from producers.queue_stats import dead_letter_count, read_queues
from shared.names import ALL_QUEUES


def overview(client: redis.Redis) -> dict[str, Any]:
    """Queues (length, non-empty priorities, oldest job's age), dead letters, and per job type
    the finished jobs by state, batches, retries and mean sizes and times."""
    queues = {
        q.queue: {
            "length": q.length,
            "by_priority": {str(p): n for p, n in sorted(q.by_priority.items(), reverse=True) if n},
            "oldest_age_s": None if q.oldest_age_s is None else round(q.oldest_age_s, 3),
        }
        for q in read_queues(client, ALL_QUEUES)
    }
    totals = read_totals(client)
    jobs: dict[str, dict[str, Any]] = {}

    def entry(job_type: str) -> dict[str, Any]:
        return jobs.setdefault(job_type, {})

    for (job_type, state), n in sorted(totals.jobs.items()):
        entry(job_type)[state] = _num(n)
    for name, per_type in totals.histograms.items():
        for job_type, hist in sorted(per_type.items()):
            mean = hist.mean()
            if name == "batch_size":
                entry(job_type)["batches"] = _num(hist.count)
                entry(job_type)["mean_batch_size"] = None if mean is None else round(mean, 2)
            else:
                entry(job_type)[f"mean_{name.removesuffix('_seconds')}_s"] = None if mean is None else round(mean, 4)
    for job_type, n in sorted(totals.batch_failures.items()):
        entry(job_type)["batch_failures"] = _num(n)
    for job_type, n in sorted(totals.retries.items()):
        entry(job_type)["retries"] = _num(n)
    return {
        "queues": queues,
        "dead_letter_queue": dead_letter_count(client),
        "dead_lettered": {q: _num(n) for q, n in sorted(totals.dead_letters.items())},
        "jobs": jobs,
    }


def _num(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value
