"""Dynamic batching, as a pure building block: no Celery, no torch.

Callers ``submit`` items from any thread and get a future. One thread, the only one that
touches the model and the device, collects items until ``max_batch_size``, or
``max_wait_s`` after the batch's first item, or the token budget, then calls
``run_batch(items) -> results`` (one result per item, in order; an exception instance in
place of a result fails that item alone). If ``run_batch`` raises, the batch is split in
halves and each half retried, down to single items, before any item is failed: one poisonous
input cannot sink its batch-mates, and a batch too large for the device's memory (an
out-of-memory error) runs as smaller ones.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

I = TypeVar("I")  # noqa: E741 - item
O = TypeVar("O")  # noqa: E741 - output

RunBatch = Callable[[list[I]], Sequence[O | BaseException]]


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 32
    max_wait_s: float = 0.01
    # Padded cost: len(batch) * max(item cost) stays within it, which is what a padded
    # forward pass actually computes. None: no budget.
    token_budget: int | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.max_wait_s < 0:
            raise ValueError("max_wait_s must be >= 0")
        if self.token_budget is not None and self.token_budget < 1:
            raise ValueError("token_budget must be >= 1")


@dataclass(frozen=True)
class Batched(Generic[O]):
    """An item's output and the size of the batch it rode in."""

    value: O
    batch_size: int


@dataclass
class BatchStats:
    batches: int = 0
    items: int = 0
    sizes: Counter[int] = field(default_factory=Counter)
    whole_batch_failures: int = 0

    def record(self, size: int) -> None:
        self.batches += 1
        self.items += size
        self.sizes[size] += 1


@dataclass
class _Pending(Generic[I, O]):
    item: I
    cost: int
    future: Future[Batched[O]]
    priority: float = 0


_STOP = object()
_LAST = float("inf")  # the stop sentinel sorts after every item


class Batcher(Generic[I, O]):
    def __init__(
        self,
        run_batch: RunBatch[I, O],
        policy: BatchPolicy,
        cost: Callable[[I], int] | None = None,
        name: str = "batcher",
        sort_by_cost: bool = True,
    ) -> None:
        self._run_batch = run_batch
        self.policy = policy
        self._cost = cost or (lambda _item: 1)
        self._sort = sort_by_cost
        self.name = name
        self.stats = BatchStats()
        # Most urgent first, then first come: (-priority, sequence, pending).
        self._queue: queue.PriorityQueue[tuple[float, int, object]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._carry: _Pending[I, O] | None = None  # an item that did not fit the last batch's budget
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # Called after each forward pass with its size and whether it raised as a whole (metrics).
        self.on_batch: Callable[[int, bool], None] | None = None

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> Batcher[I, O]:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Finish the items already submitted, then stop the batching thread."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put((_LAST, next(self._seq), _STOP))
            thread.join(timeout)

    def __enter__(self) -> Batcher[I, O]:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- producer side ---------------------------------------------------------------
    def submit(self, item: I, priority: float = 0) -> Future[Batched[O]]:
        """Queue one item; among waiting items a higher ``priority`` goes into a batch first
        (Conveyor's job priorities, 0-9). Items below 0 are background work (bulk scoring): they
        fill batches of their own, never one that an item of priority 0 or more leads."""
        future: Future[Batched[O]] = Future()
        try:
            cost = max(1, int(self._cost(item)))
        except Exception as exc:  # a cost function that chokes on an item fails that item only
            future.set_exception(exc)
            return future
        self._queue.put((-priority, next(self._seq), _Pending(item, cost, future, priority)))
        return future

    def submit_many(self, items: Sequence[I], priority: float = 0) -> list[Future[Batched[O]]]:
        return [self.submit(item, priority) for item in items]

    # -- the batching thread -----------------------------------------------------------
    def _loop(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _next(self, timeout: float | None) -> _Pending[I, O] | object | None:
        if self._carry is not None:
            carried, self._carry = self._carry, None
            return carried
        try:
            if timeout is None:
                return self._queue.get()[2]
            if timeout <= 0:
                return self._queue.get_nowait()[2]
            return self._queue.get(timeout=timeout)[2]
        except queue.Empty:
            return None

    def _collect(self) -> list[_Pending[I, O]] | None:
        """Block for a first item, then gather more until a limit is reached. None: stop."""
        first = self._next(None)
        if first is _STOP:
            return None
        assert isinstance(first, _Pending)
        batch: list[_Pending[I, O]] = []
        max_cost = 0
        if first.future.set_running_or_notify_cancel():
            batch.append(first)
            max_cost = first.cost
        deadline = time.monotonic() + self.policy.max_wait_s
        budget = self.policy.token_budget
        while len(batch) < self.policy.max_batch_size:
            nxt = self._next(deadline - time.monotonic())
            if nxt is None:
                break
            if nxt is _STOP:
                self._queue.put((_LAST, next(self._seq), _STOP))  # stop after this batch
                break
            assert isinstance(nxt, _Pending)
            if budget is not None and batch and (len(batch) + 1) * max(max_cost, nxt.cost) > budget:
                self._carry = nxt  # it leads the next batch
                break
            if first.priority >= 0 > nxt.priority:
                # Background items (priority < 0, bulk scoring) never ride with urgent ones: the
                # urgent batch runs at once and small, not at the pace of a full bulk batch.
                self._carry = nxt
                break
            if not nxt.future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            batch.append(nxt)
            max_cost = max(max_cost, nxt.cost)
        return batch

    def _run(self, batch: list[_Pending[I, O]]) -> None:
        if self._sort and len(batch) > 1:
            batch = sorted(batch, key=lambda p: p.cost)  # neighbours of similar length pad less
        self._run_split(batch)

    def _run_split(self, batch: list[_Pending[I, O]]) -> None:
        """Run ``batch``; if it raises as a whole, run each half the same way (bisection finds a
        poisonous item in log2(n) passes, and an out-of-memory batch shrinks until it fits)."""
        size = len(batch)
        self.stats.record(size)
        try:
            results = list(self._run_batch([p.item for p in batch]))
            if len(results) != size:
                raise RuntimeError(f"runner returned {len(results)} results for {size} items")
        except Exception as exc:
            self._observe(size, True)
            if size == 1:
                batch[0].future.set_exception(exc)
                return
            self.stats.whole_batch_failures += 1
            log.warning("%s: a batch of %d raised %r; retrying it in halves", self.name, size, exc)
            half = size // 2
            self._run_split(batch[:half])
            self._run_split(batch[half:])
            return
        self._observe(size, False)
        for pending, result in zip(batch, results):
            _settle(pending.future, result, size)

    def _observe(self, size: int, failed: bool) -> None:
        if self.on_batch is not None:
            try:
                self.on_batch(size, failed)
            except Exception:  # metrics must never fail a batch
                log.exception("%s: batch observer failed", self.name)


def _settle(future: Future[Batched[O]], result: O | BaseException, size: int) -> None:
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(Batched(result, size))
