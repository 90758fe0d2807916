"""Dynamic batching, as a pure building block: no Celery, no torch.

Callers ``submit`` items from any thread and get a future. One thread, the only one that
touches the model and the device, collects items until ``max_batch_size``, or
``max_wait_s`` after the batch's first item, or the token budget, then calls
``run_batch(items) -> results`` (one result per item, in order; an exception instance in
place of a result fails that item alone). If ``run_batch`` raises, the batch is split in
halves and each half retried, down to single items, before any item is failed: one poisonous
input cannot sink its batch-mates, and a batch too large for the device's memory (an
out-of-memory error) runs as smaller ones.

Background items (priority < 0: bulk scoring) yield to interactive ones (priority >= 0): they
wait behind them, never join a batch one leads, and while interactive items keep coming
(one submitted within ``busy_window_s``) a batch that a background item leads stays small
(``background_batch_size_when_busy``, the token budget in proportion). A forward pass cannot
be interrupted, so what an interactive item waits for is the batch already running: a small
one while the two kinds mix, a full one only for the first item after a quiet spell. With no
interactive item for the window, bulk batches are full again: throughput is unchanged for
bulk alone.
"""

from __future__ import annotations

import itertools
import logging
import math
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
    # While an interactive item (priority >= 0) was submitted within the last busy_window_s, a
    # batch led by a background item (priority < 0) holds at most this many items (None:
    # max(1, max_batch_size // 8)) and token_budget x this / max_batch_size padded tokens, so an
    # interactive item waits behind a small bulk batch, not a full one. busy_window_s 0: never.
    background_batch_size_when_busy: int | None = None
    busy_window_s: float = 1.0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.max_wait_s < 0:
            raise ValueError("max_wait_s must be >= 0")
        if self.token_budget is not None and self.token_budget < 1:
            raise ValueError("token_budget must be >= 1")
        if self.background_batch_size_when_busy is not None and self.background_batch_size_when_busy < 1:
            raise ValueError("background_batch_size_when_busy must be >= 1")
        if not self.busy_window_s >= 0:  # NaN too
            raise ValueError("busy_window_s must be >= 0")

    def background_limits_when_busy(self) -> tuple[int, int | None]:
        """(most items, token budget) of a background batch while interactive items come."""
        size = self.background_batch_size_when_busy or max(1, self.max_batch_size // 8)
        size = min(size, self.max_batch_size)
        if self.token_budget is None:
            return size, None
        return size, max(1, self.token_budget * size // self.max_batch_size)


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
    # Batches a background item led while interactive items were coming (held to the small size).
    background_batches_when_busy: int = 0

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
        # time.monotonic() of the last interactive submit (a float store: atomic, no lock needed).
        self._last_interactive = -math.inf
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
        fill batches of their own, never one that an item of priority 0 or more leads, and stay
        small while items of priority 0 or more keep coming (``BatchPolicy.busy_window_s``)."""
        future: Future[Batched[O]] = Future()
        try:
            cost = max(1, int(self._cost(item)))
        except Exception as exc:  # a cost function that chokes on an item fails that item only
            future.set_exception(exc)
            return future
        if priority >= 0:
            self._last_interactive = time.monotonic()  # before it is queued: the collector sees it busy
        self._queue.put((-priority, next(self._seq), _Pending(item, cost, future, priority)))
        return future

    def submit_many(self, items: Sequence[I], priority: float = 0) -> list[Future[Batched[O]]]:
        return [self.submit(item, priority) for item in items]

    # -- the batching thread -----------------------------------------------------------
    def _loop(self) -> None:
        while True:
            batch: list[_Pending[I, O]] | None = None
            try:
                batch = self._collect()
                if batch is None:
                    return
                if batch:
                    self._run(batch)
            except Exception as exc:  # the batching thread never dies: this batch fails, the next runs
                log.exception("%s: batch loop failed", self.name)
                for pending in batch or []:
                    if not pending.future.done():
                        pending.future.set_exception(exc)

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
        now = time.monotonic()
        deadline = now + self.policy.max_wait_s
        limit, budget = self.policy.max_batch_size, self.policy.token_budget
        background = first.priority < 0
        closing = False  # an interactive item joined this background batch: take no more bulk, wait no more
        if background and now - self._last_interactive < self.policy.busy_window_s:
            # Interactive items are coming: whichever arrives next waits behind this batch.
            limit, budget = self.policy.background_limits_when_busy()
            self.stats.background_batches_when_busy += 1
        while len(batch) < limit:
            nxt = self._next(0 if closing else deadline - time.monotonic())
            if nxt is None:
                break
            if nxt is _STOP:
                self._queue.put((_LAST, next(self._seq), _STOP))  # stop after this batch
                break
            assert isinstance(nxt, _Pending)
            if budget is not None and batch and (len(batch) + 1) * max(max_cost, nxt.cost) > budget:
                self._carry = nxt  # it leads the next batch
                break
            if (first.priority >= 0 or closing) and nxt.priority < 0:
                # Background items (priority < 0, bulk scoring) never ride with urgent ones: the
                # urgent batch runs at once and small, not at the pace of a full bulk batch.
                self._carry = nxt
                break
            if not nxt.future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            batch.append(nxt)
            max_cost = max(max_cost, nxt.cost)
            if background and nxt.priority >= 0:
                # An interactive item came while a bulk batch gathered (it sorts before every queued
                # bulk item): it rides in this batch with the interactive items queued beside it,
                # and the batch runs now instead of waiting to fill.
                closing = True
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
    if future.done():  # settled already (a batch loop that failed half way): keep the first outcome
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(Batched(result, size))
