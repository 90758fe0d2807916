"""Redis layout of the worker-side job metrics: the contract between the writer
(``workers/metrics.py``, in every worker) and the readers (``producers/job_stats.py``, used by
the exporter and `conveyor status`). Standard library only.

Every worker adds its deltas with HINCRBY/HINCRBYFLOAT into the same hashes, so the totals
are cluster-wide sums with no double counting, whatever the number of workers and machines.

- ``conveyor:metrics:jobs``            field ``job_type|state``  -> finished jobs
- ``conveyor:metrics:batch_failures``  field ``job_type``        -> batches that raised as a whole
- ``conveyor:metrics:retries``         field ``job_type``        -> job retries
- ``conveyor:metrics:dead_letters``    field ``queue``           -> jobs moved to the dead-letter queue
- ``conveyor:metrics:hist:<name>``     field ``job_type|<le>``   -> observations in that bucket only
                                       (not cumulative; ``+Inf`` holds those above the last bound),
                                       field ``job_type|sum``    -> sum of the observed values
- ``conveyor:metrics:flushes``         field ``worker``          -> unix time of its last flush
"""

from __future__ import annotations

from typing import Final

PREFIX: Final = "conveyor:metrics:"
JOBS_KEY: Final = PREFIX + "jobs"
BATCH_FAILURES_KEY: Final = PREFIX + "batch_failures"
RETRIES_KEY: Final = PREFIX + "retries"
DEAD_LETTERS_KEY: Final = PREFIX + "dead_letters"
FLUSHES_KEY: Final = PREFIX + "flushes"
HISTOGRAM_KEY_PREFIX: Final = PREFIX + "hist:"

SEP: Final = "|"
INF: Final = "+Inf"
SUM: Final = "sum"

JOB_STATES: Final = frozenset({"SUCCESS", "FAILURE", "REVOKED"})

# Items per forward pass.
BATCH_SIZE_BUCKETS: Final[tuple[float, ...]] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Seconds: Prometheus' defaults, then minutes and an hour for training jobs and deep queues.
LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip

# Histogram name -> its bucket bounds.
HISTOGRAMS: Final[dict[str, tuple[float, ...]]] = {
    "batch_size": BATCH_SIZE_BUCKETS,
    "queue_wait_seconds": LATENCY_BUCKETS,
    "run_seconds": LATENCY_BUCKETS,
}


def histogram_key(name: str) -> str:
    return HISTOGRAM_KEY_PREFIX + name


def bound_label(bound: float) -> str:
    """The field text of one bucket bound: 1 -> '1', 0.005 -> '0.005'."""
    return format(bound, "g")
