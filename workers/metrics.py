"""The worker-side metrics recorder: called on the hot path, flushed to Redis in the background.

Each call adds to plain in-memory counters under one lock (well under a microsecond); a daemon
thread swaps them out every ``flush_every_s`` and adds the deltas to Redis hashes in one
pipeline (layout: ``shared/metrics_keys.py``). Totals are sums over every worker, so several
workers on several machines add up without double counting, and the exporter only reads them.
If Redis cannot be reached the deltas are kept and added on the next flush: nothing is lost
while the worker lives.

    metrics = WorkerMetrics(redis_client, worker="cpu@host").start()
    metrics.batch("classify", 17)
    metrics.job("classify", "SUCCESS", queue_s=0.03, run_s=0.12)
    metrics.stop()   # flushes once more
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from typing import Self

import redis

from shared.metrics_keys import (
    BATCH_FAILURES_KEY,
    BATCH_SIZE_BUCKETS,
    DEAD_LETTERS_KEY,
    FLUSHES_KEY,
    HISTOGRAMS,
    INF,
    JOB_STATES,
    JOBS_KEY,
    LATENCY_BUCKETS,
    RETRIES_KEY,
    SEP,
    SUM,
    bound_label,
    histogram_key,
)

log = logging.getLogger("conveyor.metrics")

# Per job type, all in-memory counts live in one flat list (index arithmetic is cheaper than
# dict keys on the hot path); the layout below maps each slot to its Redis hash and field.
_STATES = ("SUCCESS", "FAILURE", "REVOKED")
_N_BATCH = len(BATCH_SIZE_BUCKETS) + 1  # buckets, +Inf last
_N_LAT = len(LATENCY_BUCKETS) + 1
_STATE0 = 0
_BATCH0 = _STATE0 + len(_STATES)
_BATCH_SUM = _BATCH0 + _N_BATCH
_WAIT0 = _BATCH_SUM + 1
_WAIT_SUM = _WAIT0 + _N_LAT
_RUN0 = _WAIT_SUM + 1
_RUN_SUM = _RUN0 + _N_LAT
_BATCH_FAILURES = _RUN_SUM + 1
_RETRIES = _BATCH_FAILURES + 1
_SLOTS = _RETRIES + 1
_STATE_INDEX = {state: _STATE0 + i for i, state in enumerate(_STATES)}
assert set(_STATES) == JOB_STATES


def _layout() -> list[tuple[str, str, bool]]:
    """Slot -> (Redis hash, field suffix after "job_type|" or "" for the bare job type, is a float sum)."""
    slots: list[tuple[str, str, bool]] = [(JOBS_KEY, state, False) for state in _STATES]
    for name, bounds, float_sum in (
        ("batch_size", BATCH_SIZE_BUCKETS, False),
        ("queue_wait_seconds", LATENCY_BUCKETS, True),
        ("run_seconds", LATENCY_BUCKETS, True),
    ):
        key = histogram_key(name)
        slots += [(key, bound_label(b), False) for b in bounds] + [(key, INF, False), (key, SUM, float_sum)]
    slots += [(BATCH_FAILURES_KEY, "", False), (RETRIES_KEY, "", False)]
    assert len(slots) == _SLOTS and set(HISTOGRAMS) == {"batch_size", "queue_wait_seconds", "run_seconds"}
    return slots


_LAYOUT = _layout()


class WorkerMetrics:
    def __init__(self, client: redis.Redis, worker: str, flush_every_s: float = 1.0) -> None:
        if flush_every_s <= 0:
            raise ValueError(f"flush_every_s must be positive, got {flush_every_s}")
        self.client = client
        self.worker = worker
        self.flush_every_s = flush_every_s
        self._lock = threading.Lock()
        self._by_type: dict[str, list[float]] = {}  # job_type -> _SLOTS counts
        self._dead: dict[str, int] = {}  # queue -> dead-lettered jobs
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    # -- the hot path: list slots under one lock -----------------------------------------------
    def batch(self, job_type: str, size: int) -> None:
        """One forward pass of ``size`` items."""
        slot = _BATCH0 + bisect_left(BATCH_SIZE_BUCKETS, size)
        with self._lock:
            counts = self._by_type.get(job_type) or self._new(job_type)
            counts[slot] += 1
            counts[_BATCH_SUM] += size

    def batch_failed(self, job_type: str) -> None:
        """A whole batch raised (its items are then retried one by one by the worker)."""
        with self._lock:
            (self._by_type.get(job_type) or self._new(job_type))[_BATCH_FAILURES] += 1

    def job(self, job_type: str, state: str, queue_s: float | None, run_s: float) -> None:
        """A job finished in ``state`` (SUCCESS, FAILURE or REVOKED) after waiting ``queue_s``
        in the queue (None: unknown) and running ``run_s`` seconds."""
        state_slot = _STATE_INDEX.get(state)
        if state_slot is None:
            raise ValueError(f"job state must be one of {', '.join(_STATES)}, got {state!r}")
        run_slot = _RUN0 + bisect_left(LATENCY_BUCKETS, run_s)
        with self._lock:
            counts = self._by_type.get(job_type) or self._new(job_type)
            counts[state_slot] += 1
            counts[run_slot] += 1
            counts[_RUN_SUM] += run_s
            if queue_s is not None:
                counts[_WAIT0 + bisect_left(LATENCY_BUCKETS, queue_s)] += 1
                counts[_WAIT_SUM] += queue_s

    def retried(self, job_type: str) -> None:
        with self._lock:
            (self._by_type.get(job_type) or self._new(job_type))[_RETRIES] += 1

    def dead_lettered(self, queue: str) -> None:
        with self._lock:
            self._dead[queue] = self._dead.get(queue, 0) + 1

    def _new(self, job_type: str) -> list[float]:
        counts: list[float] = [0] * _SLOTS
        self._by_type[job_type] = counts
        return counts

    # -- flushing ------------------------------------------------------------------------------
    def start(self) -> Self:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="conveyor-metrics", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the flusher and flush what is left."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_every_s):
            try:
                self.flush()
            except Exception:  # the flusher never dies: these counts are lost, the next ones are not
                log.exception("metrics flush failed")

    def flush(self) -> bool:
        """Add the counts recorded since the last flush to Redis; False (counts kept) if it failed."""
        with self._lock:
            by_type, self._by_type = self._by_type, {}
            dead, self._dead = self._dead, {}
        # MULTI/EXEC: all the deltas land or none do, so a retry never counts twice.
        pipe = self.client.pipeline(transaction=True)
        for job_type, counts in by_type.items():
            for (key, suffix, float_sum), n in zip(_LAYOUT, counts, strict=True):
                if n:
                    fld = job_type + SEP + suffix if suffix else job_type
                    if float_sum:
                        pipe.hincrbyfloat(key, fld, n)
                    else:
                        pipe.hincrby(key, fld, int(n))
        for queue, n in dead.items():
            pipe.hincrby(DEAD_LETTERS_KEY, queue, n)
        pipe.hset(FLUSHES_KEY, self.worker, repr(time.time()))
        try:
            pipe.execute()
        except (redis.RedisError, OSError) as exc:
            self._merge_back(by_type, dead)
            if not self._failing:
                log.warning("metrics flush to Redis failed (%s); keeping the counts for the next try", exc)
            self._failing = True
            return False
        if self._failing:
            log.info("metrics flush to Redis works again")
        self._failing = False
        return True

    def _merge_back(self, by_type: dict[str, list[float]], dead: dict[str, int]) -> None:
        with self._lock:
            for job_type, counts in by_type.items():
                mine = self._by_type.get(job_type) or self._new(job_type)
                for i, n in enumerate(counts):
                    mine[i] += n
            for queue, n in dead.items():
                self._dead[queue] = self._dead.get(queue, 0) + n

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
