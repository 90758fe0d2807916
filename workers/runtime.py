"""Per-process worker state: the device, the model store and cache, and one batcher per
inference job type; and the one path every inference job takes through them.

``Runtime.submit`` takes validated jobs (many at once, from the bulk ingest), checks each
deadline, lets the job's kind prepare it (model pinned, texts tokenized, audio decoded),
hands its items to the kind's batcher, and calls ``done(job, result_or_error)`` when the
last item is out. ``Runtime.run`` is the same for one job, waiting. Built once, after the
worker has started (never at import time).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from typing import Any

from shared import kinds
from shared.errors import JobExpired, TransientError
from shared.jobs import JobBase
from shared.model_store import ModelStore
from shared.settings import Settings
from workers.batcher import Batched, Batcher, BatchPolicy
from workers.kinds import JobKind, Prepared
from workers.model_cache import ModelCache

log = logging.getLogger(__name__)

Done = Callable[[JobBase, "dict[str, Any] | BaseException"], None]
BatchObserver = Callable[[str, int, bool], None]  # job type, batch size, whole batch failed


def pick_device(wanted: str) -> str:
    import torch

    if wanted == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return wanted


def _build_kind(job_type: str, store: ModelStore, cache: ModelCache, device: str) -> JobKind:
    """The kind's runner, from the registry's import path (torch is imported here, on first use)."""
    spec = kinds.get(job_type)
    if not spec.inference:
        raise ValueError(f"{job_type!r} is not an inference job type")
    kind: JobKind = kinds.import_path(spec.runner)(store, cache, device)
    return kind


class Runtime:
    def __init__(
        self,
        settings: Settings,
        worker: str = "unknown",
        device: str | None = None,
        on_batch: BatchObserver | None = None,
    ) -> None:
        self.settings = settings
        self.worker = worker
        self.device = pick_device(device or settings.device)
        self.store = ModelStore(settings.models_path)
        self.cache = ModelCache(settings.model_cache_mb * 1024 * 1024)
        self.policy = BatchPolicy(
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000.0,
            token_budget=settings.token_budget,
        )
        self.on_batch = on_batch
        self._kinds: dict[str, JobKind] = {}
        self._batchers: dict[str, Batcher[Any, Any]] = {}
        self._lock = threading.Lock()
        self._gathers: dict[int, _Gather] = {}  # id(job) -> its items in a batcher
        self._cancelled: set[int] = set()  # id(job) of jobs given up before their items were queued
        # Slow preparation (audio decoding) runs here, in parallel with the model.
        self._slow = ThreadPoolExecutor(max_workers=4, thread_name_prefix="prepare")

    # -- kinds and batchers --------------------------------------------------------------
    def kind(self, job_type: str) -> JobKind:
        with self._lock:
            if job_type not in self._kinds:
                kind = _build_kind(job_type, self.store, self.cache, self.device)
                policy = self.policy
                wide = getattr(kind, "min_batch_size", None)
                if wide:  # e.g. recommend: a user is one row of a matrix product
                    policy = BatchPolicy(max(policy.max_batch_size, wide), policy.max_wait_s, None)
                batcher = kind.build_batcher(policy)
                batcher.on_batch = self._observer(job_type)
                self._batchers[job_type] = batcher.start()
                self._kinds[job_type] = kind
            return self._kinds[job_type]

    def batcher(self, job_type: str) -> Batcher[Any, Any]:
        self.kind(job_type)
        return self._batchers[job_type]

    def _observer(self, job_type: str) -> Callable[[int, bool], None] | None:
        if self.on_batch is None:
            return None
        on_batch = self.on_batch
        return lambda size, failed: on_batch(job_type, size, failed)

    def stop(self) -> None:
        with self._lock:
            batchers, self._batchers, self._kinds = list(self._batchers.values()), {}, {}
        for batcher in batchers:
            batcher.stop()
        self._slow.shutdown(wait=False, cancel_futures=True)

    # -- the path of a job -----------------------------------------------------------------
    def submit(self, jobs: Sequence[JobBase], done: Done, urgency: Callable[[JobBase], float] | None = None) -> None:
        """Start ``jobs`` (of any inference types); ``done`` is called once per job, from a
        batcher thread or this one, with its result body or the error that failed it.
        ``urgency`` orders items waiting in a batcher (default: the job's priority)."""
        picked_at = datetime.now(UTC)
        started = time.monotonic()
        rank = urgency or _job_priority
        by_type: dict[str, list[JobBase]] = {}
        for job in jobs:
            try:
                check_deadline(job)
            except JobExpired as exc:
                done(job, exc)
                continue
            by_type.setdefault(job.type, []).append(job)
        for job_type, group in by_type.items():
            try:
                kind = self.kind(job_type)
            except Exception as exc:  # a model that cannot load fails these jobs, not the worker
                log.exception("cannot serve %s jobs", job_type)
                for job in group:
                    done(job, exc)
                continue
            if kind.slow_prepare:
                for job in group:  # one job per task: a slow file does not hold up the others
                    self._slow.submit(self._start, kind, [job], done, picked_at, started, rank)
            else:
                self._start(kind, group, done, picked_at, started, rank)

    def _start(
        self,
        kind: JobKind,
        jobs: list[JobBase],
        done: Done,
        picked_at: datetime,
        started: float,
        rank: Callable[[JobBase], float],
    ) -> None:
        if self._cancelled:
            with self._lock:
                given_up = [job for job in jobs if id(job) in self._cancelled]
                self._cancelled.difference_update(id(job) for job in given_up)
            if given_up:
                jobs = [job for job in jobs if id(job) not in {id(g) for g in given_up}]
        try:
            prepared = kind.prepare(jobs)
        except Exception as exc:
            prepared = [exc] * len(jobs)
        batcher = self._batchers[kind.job_type]
        for job, prep in zip(jobs, prepared):
            if isinstance(prep, BaseException):
                done(job, prep)
                continue
            gather = _Gather(self, kind, job, prep, done, picked_at, started)
            with self._lock:
                self._gathers[id(job)] = gather
            gather.attach(batcher.submit_many(prep.items, rank(job)))

    def cancel(self, job: JobBase) -> None:
        """Give up ``job``: its items still waiting in a batcher are dropped (a batch already on
        the device finishes; its output is discarded), and ``done`` is not called for it."""
        with self._lock:
            gather = self._gathers.pop(id(job), None)
            if gather is None:
                self._cancelled.add(id(job))  # still being prepared (audio decoding): skipped there
                if len(self._cancelled) > 10_000:  # ids of jobs that were never going to start
                    self._cancelled.clear()
                return
        gather.cancel()

    def _finished(self, job: JobBase) -> None:
        with self._lock:
            self._gathers.pop(id(job), None)

    def run(self, job: JobBase, timeout: float | None = None) -> dict[str, Any]:
        """One job, waiting for its result (Celery's per-task path uses this)."""
        box: Future[dict[str, Any]] = Future()

        def done(_job: JobBase, out: dict[str, Any] | BaseException) -> None:
            if isinstance(out, BaseException):
                box.set_exception(out)
            else:
                box.set_result(out)

        self.submit([job], done)
        return box.result(timeout)

    def meta(self, job: JobBase, model: str, sizes: list[int], picked_at: datetime, started: float) -> dict[str, Any]:
        return {
            "worker": self.worker,
            "device": self.device,
            "model": model,
            "batch_sizes": sizes,
            "queue_ms": round((picked_at - job.submitted_at).total_seconds() * 1000.0, 3),
            "run_ms": round((time.monotonic() - started) * 1000.0, 3),
        }


class _Gather:
    """Collects one job's item outputs; the job is done when the last one is in, or failed
    at its first error (in item order is not kept: the first to arrive wins)."""

    __slots__ = (
        "runtime", "kind", "job", "prep", "done", "picked_at", "started", "outs", "sizes", "left", "lock", "futures",
    )  # fmt: skip

    def __init__(
        self,
        runtime: Runtime,
        kind: JobKind,
        job: JobBase,
        prep: Prepared,
        done: Done,
        picked_at: datetime,
        started: float,
    ) -> None:
        self.runtime, self.kind, self.job, self.prep, self.done = runtime, kind, job, prep, done
        self.picked_at, self.started = picked_at, started
        n = len(prep.items)
        self.outs: list[Any] = [None] * n
        self.sizes: list[int] = [0] * n
        self.left = n
        self.lock = threading.Lock()
        self.futures: list[Future[Batched[Any]]] = []

    def attach(self, futures: list[Future[Batched[Any]]]) -> None:
        self.futures = futures
        for i, future in enumerate(futures):
            future.add_done_callback(partial(self._item_done, i))

    def cancel(self) -> None:
        with self.lock:
            self.left = 0  # done() is not called for a job given up
        for future in self.futures:
            future.cancel()

    def _item_done(self, i: int, future: Future[Batched[Any]]) -> None:
        exc = future.exception() if not future.cancelled() else RuntimeError("item cancelled")
        if exc is not None:
            exc = as_transient(exc)
        with self.lock:
            if self.left <= 0:
                return  # already failed
            if exc is not None:
                self.left = 0
            else:
                batched = future.result()
                self.outs[i], self.sizes[i] = batched.value, batched.batch_size
                self.left -= 1
                if self.left:
                    return
        self.runtime._finished(self.job)
        if exc is not None:
            self.done(self.job, exc)
            return
        try:
            body = self.kind.finish(self.job, self.prep, self.outs)
            meta = self.runtime.meta(self.job, self.prep.model, self.sizes, self.picked_at, self.started)
            out: dict[str, Any] | BaseException = {"job_id": self.job.id, "type": self.job.type, **body, "meta": meta}
        except Exception as err:  # a result that cannot be assembled fails this job alone
            out = err
        self.done(self.job, out)


# Failures worth another try, by type name so this module need not import torch or redis:
# the device ran out of memory even for one item (the batcher already split the batch), or a
# connection dropped.
_TRANSIENT_TYPES = frozenset({"OutOfMemoryError", "ConnectionError", "TimeoutError", "ConnectionResetError"})


def as_transient(exc: BaseException) -> BaseException:
    """``exc``, or a TransientError carrying its message when it is worth a retry."""
    if getattr(exc, "retryable", False) or not any(t.__name__ in _TRANSIENT_TYPES for t in type(exc).__mro__):
        return exc
    return TransientError(f"{type(exc).__name__}: {exc}")


def _job_priority(job: JobBase) -> float:
    return float(job.priority)


def check_deadline(job: JobBase) -> None:
    if job.deadline is not None and datetime.now(UTC) > job.deadline:
        raise JobExpired(f"job {job.id} passed its deadline {job.deadline.isoformat()} before it ran")
