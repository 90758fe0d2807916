"""Cluster-wide job totals that the workers' recorders (workers/metrics.py) add up in Redis:
jobs by type and state, batch sizes, queue wait and run time, whole-batch failures, retries,
dead-lettered jobs. Read by the exporter and `conveyor status`; layout in shared/metrics_keys.py."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import redis

from shared.metrics_keys import (
    BATCH_FAILURES_KEY,
    DEAD_LETTERS_KEY,
    FLUSHES_KEY,
    HISTOGRAMS,
    INF,
    JOBS_KEY,
    RETRIES_KEY,
    SEP,
    SUM,
    bound_label,
    histogram_key,
)


@dataclass
class Histogram:
    """One job type's histogram: cumulative counts per upper bound, as Prometheus wants them."""

    bounds: tuple[float, ...]
    per_bucket: dict[str, float] = field(default_factory=dict)  # bound label or +Inf -> count in it
    sum: float = 0.0

    @property
    def count(self) -> float:
        return sum(self.per_bucket.values())

    def cumulative(self) -> list[tuple[float, float]]:
        """(upper bound, observations <= bound), ending with (inf, count)."""
        out, running = [], 0.0
        for bound in self.bounds:
            running += self.per_bucket.get(bound_label(bound), 0.0)
            out.append((bound, running))
        out.append((math.inf, self.count))
        return out

    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None

    def quantile(self, q: float) -> float | None:
        """The q-quantile as Prometheus' histogram_quantile estimates it: linear within the bucket
        that holds it; the highest finite bound when it falls in +Inf. None without observations."""
        total = self.count
        if not total:
            return None
        rank, lower, below = q * total, 0.0, 0.0
        for bound, cumulative in self.cumulative():
            if cumulative >= rank:
                if math.isinf(bound):
                    return self.bounds[-1] if self.bounds else None
                inside = cumulative - below
                return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
            lower, below = bound, cumulative
        return None


@dataclass
class JobTotals:
    jobs: dict[tuple[str, str], float]  # (job_type, state) -> jobs
    histograms: dict[str, dict[str, Histogram]]  # histogram name -> job_type -> histogram
    batch_failures: dict[str, float]  # job_type -> batches
    retries: dict[str, float]  # job_type -> retries
    dead_letters: dict[str, float]  # queue -> jobs
    last_flush: dict[str, float]  # worker -> unix time


def read_totals(client: redis.Redis) -> JobTotals:
    pipe = client.pipeline(transaction=False)
    for key in (JOBS_KEY, BATCH_FAILURES_KEY, RETRIES_KEY, DEAD_LETTERS_KEY, FLUSHES_KEY):
        pipe.hgetall(key)
    for name in HISTOGRAMS:
        pipe.hgetall(histogram_key(name))
    jobs_raw, failures_raw, retries_raw, dead_raw, flushes_raw, *hist_raw = pipe.execute()

    jobs: dict[tuple[str, str], float] = {}
    for fld, value in _decoded(jobs_raw):
        job_type, _, state = fld.rpartition(SEP)
        if job_type:
            jobs[(job_type, state)] = value

    histograms: dict[str, dict[str, Histogram]] = {}
    for (name, bounds), raw in zip(HISTOGRAMS.items(), hist_raw, strict=True):
        per_type: dict[str, Histogram] = {}
        known = {bound_label(b) for b in bounds} | {INF}
        for fld, value in _decoded(raw):
            job_type, _, part = fld.rpartition(SEP)
            if not job_type:
                continue
            hist = per_type.setdefault(job_type, Histogram(bounds))
            if part == SUM:
                hist.sum = value
            elif part in known:
                hist.per_bucket[part] = value
            else:  # a bound from another version's layout: still counted, in +Inf
                hist.per_bucket[INF] = hist.per_bucket.get(INF, 0.0) + value
        histograms[name] = per_type

    return JobTotals(
        jobs=jobs,
        histograms=histograms,
        batch_failures=dict(_decoded(failures_raw)),
        retries=dict(_decoded(retries_raw)),
        dead_letters=dict(_decoded(dead_raw)),
        last_flush=dict(_decoded(flushes_raw)),
    )


def _decoded(raw: dict[bytes, bytes]) -> list[tuple[str, float]]:
    out = []
    for key, value in raw.items():
        try:
            out.append((key.decode(), float(value)))
        except (UnicodeDecodeError, ValueError):
            continue  # not ours: never let one bad field hide the rest
    return out
