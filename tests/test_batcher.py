"""The batcher alone: events and timeouts, no Celery, no model."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

import pytest

from workers.batcher import Batcher, BatchPolicy


class Recorder:
    """A runner that records each batch it was given and squares numbers; negatives fail alone."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.gate = gate

    def __call__(self, items: list[int]) -> list[int | BaseException]:
        if self.gate is not None:
            self.gate.wait(5)
        self.batches.append(list(items))
        return [ValueError(f"negative: {i}") if i < 0 else i * i for i in items]


def test_size_flush_runs_a_full_batch_without_waiting() -> None:
    runner = Recorder()
    with Batcher(runner, BatchPolicy(max_batch_size=4, max_wait_s=30.0)) as batcher:
        started = time.monotonic()
        futures = batcher.submit_many([1, 2, 3, 4])
        results = [f.result(timeout=5) for f in futures]
        elapsed = time.monotonic() - started
    assert [r.value for r in results] == [1, 4, 9, 16]
    assert [r.batch_size for r in results] == [4, 4, 4, 4]
    assert runner.batches == [[1, 2, 3, 4]]
    assert elapsed < 5.0  # far below the 30 s wait: the size limit flushed it


def test_time_flush_runs_a_partial_batch_after_max_wait() -> None:
    runner = Recorder()
    with Batcher(runner, BatchPolicy(max_batch_size=100, max_wait_s=0.2)) as batcher:
        started = time.monotonic()
        futures = batcher.submit_many([1, 2, 3])
        assert [f.result(timeout=5).value for f in futures] == [1, 4, 9]
        elapsed = time.monotonic() - started
    assert runner.batches == [[1, 2, 3]]
    assert 0.15 <= elapsed < 5.0


def test_token_budget_splits_batches_by_padded_cost() -> None:
    runner = Recorder()
    # cost = the number itself; budget 10 padded tokens: (n items) x (largest) <= 10
    with Batcher(runner, BatchPolicy(max_batch_size=100, max_wait_s=0.05, token_budget=10), cost=lambda i: i) as b:
        futures = b.submit_many([2, 2, 2, 2, 2, 5, 5, 1])
        wait(futures, timeout=5)
    for batch in runner.batches:
        assert len(batch) == 1 or len(batch) * max(batch) <= 10
    assert sorted(i for batch in runner.batches for i in batch) == [1, 2, 2, 2, 2, 2, 5, 5]
    assert [len(b) for b in runner.batches][0] == 5  # 5 x 2 = 10 fits, the 5 would not


def test_an_item_over_the_budget_still_runs_alone() -> None:
    runner = Recorder()
    with Batcher(runner, BatchPolicy(max_batch_size=8, max_wait_s=0.05, token_budget=4), cost=lambda i: i) as b:
        assert b.submit(9).result(timeout=5).value == 81
    assert runner.batches == [[9]]


def test_sorts_by_cost_inside_a_batch_and_returns_results_in_submit_order() -> None:
    runner = Recorder()
    with Batcher(runner, BatchPolicy(max_batch_size=4, max_wait_s=1.0), cost=lambda i: i) as b:
        futures = b.submit_many([3, 1, 4, 2])
        assert [f.result(timeout=5).value for f in futures] == [9, 1, 16, 4]
    assert runner.batches == [[1, 2, 3, 4]]


def test_a_bad_item_fails_alone_and_its_batch_mates_succeed() -> None:
    runner = Recorder()
    with Batcher(runner, BatchPolicy(max_batch_size=3, max_wait_s=1.0)) as b:
        good1, bad, good2 = b.submit_many([2, -1, 3])
        assert good1.result(timeout=5).value == 4
        assert good2.result(timeout=5).value == 9
        with pytest.raises(ValueError, match="negative: -1"):
            bad.result(timeout=5)
    assert runner.batches == [[2, -1, 3]]


def test_a_batch_that_raises_is_retried_in_halves_until_the_poison_is_alone() -> None:
    calls: list[list[int]] = []

    def fragile(items: list[int]) -> list[int]:
        calls.append(list(items))
        if 13 in items:
            raise RuntimeError("poisoned input 13")
        return [i + 1 for i in items]

    with Batcher(fragile, BatchPolicy(max_batch_size=3, max_wait_s=1.0)) as b:
        f1, f13, f2 = b.submit_many([1, 13, 2])
        assert f1.result(timeout=5).value == 2
        assert f2.result(timeout=5).value == 3
        with pytest.raises(RuntimeError, match="poisoned input 13"):
            f13.result(timeout=5)
        assert b.stats.whole_batch_failures == 2
    # [1, 13, 2] -> [1] and [13, 2] -> [13] and [2]: bisection, not one call per item.
    assert calls == [[1, 13, 2], [1], [13, 2], [13], [2]]


class FakeOutOfMemory(RuntimeError):
    """Stands for torch.OutOfMemoryError: the batcher is pure and must not need torch."""


def test_a_batch_too_large_for_memory_runs_as_smaller_batches() -> None:
    sizes: list[int] = []
    observed: list[tuple[int, bool]] = []

    def small_device(items: list[int]) -> list[int]:
        sizes.append(len(items))
        if len(items) > 2:
            raise FakeOutOfMemory(f"cannot fit {len(items)} items")
        return [i * 10 for i in items]

    b: Batcher[int, int] = Batcher(small_device, BatchPolicy(max_batch_size=8, max_wait_s=1.0))
    b.on_batch = lambda size, failed: observed.append((size, failed))
    with b:
        futures = b.submit_many(list(range(8)))
        assert [f.result(timeout=5).value for f in futures] == [i * 10 for i in range(8)]
    assert sizes[0] == 8 and max(sizes[1:]) <= 4 and all(s <= 2 for s in sizes if s not in (8, 4))
    assert (8, True) in observed and sum(size for size, failed in observed if not failed) == 8


def test_a_runner_returning_the_wrong_count_is_caught() -> None:
    def short(items: list[int]) -> list[int]:
        return items[:-1]

    with Batcher(short, BatchPolicy(max_batch_size=2, max_wait_s=1.0)) as b:
        f1, f2 = b.submit_many([1, 2])
        # Retried alone, each call returns zero results for one item: both fail, clearly.
        for f in (f1, f2):
            with pytest.raises(RuntimeError, match="returned 0 results for 1 item"):
                f.result(timeout=5)


def test_a_failing_cost_function_fails_that_item_only() -> None:
    def cost(i: int) -> int:
        if i == 0:
            raise ValueError("cannot measure 0")
        return i

    with Batcher(Recorder(), BatchPolicy(max_batch_size=2, max_wait_s=0.05), cost=cost) as b:
        bad = b.submit(0)
        good = b.submit(5)
        with pytest.raises(ValueError, match="cannot measure 0"):
            bad.result(timeout=5)
        assert good.result(timeout=5).value == 25


def test_concurrent_submitters_all_get_their_own_results_in_shared_batches() -> None:
    runner = Recorder()
    with Batcher(runner, BatchPolicy(max_batch_size=16, max_wait_s=0.02)) as b:
        with ThreadPoolExecutor(max_workers=32) as pool:
            results = list(pool.map(lambda i: b.submit(i).result(timeout=10), range(400)))
    assert [r.value for r in results] == [i * i for i in range(400)]
    assert sum(len(batch) for batch in runner.batches) == 400
    assert max(len(batch) for batch in runner.batches) > 1
    assert all(len(batch) <= 16 for batch in runner.batches)


def test_items_arriving_while_a_batch_runs_form_the_next_batch() -> None:
    gate = threading.Event()
    runner = Recorder(gate)
    with Batcher(runner, BatchPolicy(max_batch_size=8, max_wait_s=0.01)) as b:
        first = b.submit(1)
        time.sleep(0.1)  # the first batch is now running (blocked on the gate)
        rest = b.submit_many([2, 3, 4])
        gate.set()
        first.result(timeout=5)
        assert [f.result(timeout=5).value for f in rest] == [4, 9, 16]
    assert runner.batches == [[1], [2, 3, 4]]


def test_a_cancelled_future_is_skipped() -> None:
    gate = threading.Event()
    runner = Recorder(gate)
    with Batcher(runner, BatchPolicy(max_batch_size=8, max_wait_s=0.01)) as b:
        blocker = b.submit(1)
        time.sleep(0.1)
        doomed, kept = b.submit_many([2, 3])
        assert doomed.cancel()
        gate.set()
        blocker.result(timeout=5)
        assert kept.result(timeout=5).value == 9
    assert [2] not in runner.batches and all(2 not in batch for batch in runner.batches)


def test_stop_finishes_what_was_submitted() -> None:
    runner = Recorder()
    b = Batcher(runner, BatchPolicy(max_batch_size=2, max_wait_s=0.5)).start()
    futures = b.submit_many([1, 2, 3])
    b.stop(timeout=5)
    assert [f.result(timeout=1).value for f in futures] == [1, 4, 9]


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        BatchPolicy(max_batch_size=0)
    with pytest.raises(ValueError):
        BatchPolicy(max_wait_s=-1)
    with pytest.raises(ValueError):
        BatchPolicy(token_budget=0)
    with pytest.raises(ValueError):
        BatchPolicy(background_batch_size_when_busy=0)
    for window in (-1.0, float("nan")):
        with pytest.raises(ValueError):
            BatchPolicy(busy_window_s=window)


def test_urgent_items_overtake_waiting_bulk_items() -> None:
    release = threading.Event()
    seen: list[list[str]] = []

    def run(items: list[str]) -> list[str]:
        if items == ["first"]:
            release.wait(5)  # holds the batching thread while the others queue up
        seen.append(list(items))
        return items

    with Batcher(run, BatchPolicy(max_batch_size=2, max_wait_s=0.0)) as b:
        first = b.submit("first")
        time.sleep(0.1)
        bulk = b.submit_many([f"bulk{i}" for i in range(6)], priority=-1)
        urgent = b.submit("urgent", priority=9)
        normal = b.submit("normal")
        release.set()
        for f in [first, *bulk, urgent, normal]:
            f.result(timeout=5)
    assert seen[0] == ["first"]
    assert seen[1] == ["urgent", "normal"]  # both waited behind six bulk items, and went first
    assert [x for batch in seen[2:] for x in batch] == [f"bulk{i}" for i in range(6)]  # bulk keeps its order


def test_background_items_never_ride_in_an_urgent_batch() -> None:
    release = threading.Event()
    seen: list[list[str]] = []

    def run(items: list[str]) -> list[str]:
        if items == ["first"]:
            release.wait(5)
        seen.append(list(items))
        return items

    # busy_window_s 0: bulk batches stay full-size after the urgent item (the shrinking is tested below).
    with Batcher(run, BatchPolicy(max_batch_size=4, max_wait_s=0.0, busy_window_s=0.0)) as b:
        first = b.submit("first", priority=-1)
        time.sleep(0.1)
        bulk = b.submit_many([f"bulk{i}" for i in range(5)], priority=-1)
        urgent = b.submit("urgent", priority=0)
        release.set()
        for f in [first, *bulk, urgent]:
            f.result(timeout=5)
    # The urgent item runs alone, next (no bulk items beside it, though four would fit).
    assert seen[1] == ["urgent"]
    assert seen[2:] == [["bulk0", "bulk1", "bulk2", "bulk3"], ["bulk4"]]


def test_out_of_memory_even_for_one_item_becomes_a_transient_error() -> None:
    from shared.errors import TransientError
    from workers.runtime import as_transient

    class OutOfMemoryError(RuntimeError):  # the name torch.OutOfMemoryError has
        pass

    oom = as_transient(OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert isinstance(oom, TransientError) and oom.retryable and "out of memory" in str(oom)
    assert isinstance(as_transient(ConnectionResetError("peer reset")), TransientError)
    plain = ValueError("bad input")
    assert as_transient(plain) is plain  # anything else is not retried


# -- bulk batches shrink while interactive items come -------------------------------------------


class Gated:
    """A runner that holds the batching thread on its first batch until ``release`` is set, and
    records every batch (names) in order."""

    def __init__(self, per_item_s: float = 0.0) -> None:
        self.release = threading.Event()
        self.running = threading.Event()
        self.batches: list[list[str]] = []
        self.per_item_s = per_item_s

    def __call__(self, items: list[str]) -> list[str]:
        if not self.batches and not self.running.is_set():
            self.running.set()
            self.release.wait(5)
        self.batches.append(list(items))
        if self.per_item_s:
            time.sleep(self.per_item_s * len(items))
        return items

    def sizes(self) -> list[int]:
        return [len(batch) for batch in self.batches]


def _bulk(n: int, start: int = 0) -> list[str]:
    return [f"bulk{i}" for i in range(start, start + n)]


def test_background_limits_when_busy_follow_the_policy() -> None:
    assert BatchPolicy(max_batch_size=32, token_budget=8192).background_limits_when_busy() == (4, 1024)
    assert BatchPolicy(max_batch_size=4).background_limits_when_busy() == (1, None)
    assert BatchPolicy(max_batch_size=8, background_batch_size_when_busy=100).background_limits_when_busy() == (8, None)
    assert BatchPolicy(
        max_batch_size=8, token_budget=10, background_batch_size_when_busy=1
    ).background_limits_when_busy() == (
        1,
        1,
    )


def test_bulk_alone_runs_in_full_batches() -> None:
    runner = Gated()
    with Batcher(runner, BatchPolicy(max_batch_size=16, max_wait_s=0.0)) as b:
        first = b.submit("first", priority=-1)
        assert runner.running.wait(5)
        rest = b.submit_many(_bulk(64), priority=-1)
        runner.release.set()
        for f in [first, *rest]:
            f.result(timeout=5)
        assert b.stats.background_batches_when_busy == 0
    assert runner.sizes() == [1, 16, 16, 16, 16]


def test_bulk_batches_shrink_while_interactive_items_come_and_grow_back_after() -> None:
    runner = Gated()
    policy = BatchPolicy(max_batch_size=16, max_wait_s=0.0, busy_window_s=1.0)  # small size: 16 // 8 = 2
    with Batcher(runner, policy) as b:
        first = b.submit("first", priority=-1)
        assert runner.running.wait(5)
        bulk = b.submit_many(_bulk(10), priority=-1)
        urgent = b.submit("urgent", priority=0)
        runner.release.set()
        for f in [first, *bulk, urgent]:
            f.result(timeout=5)
        assert runner.batches[1] == ["urgent"]
        assert runner.sizes()[2:] == [2, 2, 2, 2, 2]  # the next interactive item waits behind 2 rows, not 16
        assert [x for batch in runner.batches[2:] for x in batch] == _bulk(10)  # bulk keeps its order
        assert b.stats.background_batches_when_busy == 5

        time.sleep(1.1)  # no interactive item for the window: full batches again
        runner.batches.clear()
        runner.release.clear()
        runner.running.clear()
        lead = b.submit("lead", priority=-1)
        assert runner.running.wait(5)
        later = b.submit_many(_bulk(32, 10), priority=-1)
        runner.release.set()
        for f in [lead, *later]:
            f.result(timeout=5)
    assert runner.sizes() == [1, 16, 16]


def test_the_token_budget_shrinks_with_the_size_while_busy() -> None:
    runner = Gated()
    # 4 items while busy, and a budget of 16 x 4 / 8 = 8 padded tokens: items of cost 3 go two at a time.
    policy = BatchPolicy(max_batch_size=8, max_wait_s=0.0, token_budget=16, background_batch_size_when_busy=4)
    runner.running.set()  # no gate
    with Batcher(runner, policy, cost=lambda _item: 3) as b:
        b.submit("urgent", priority=5).result(timeout=5)
        assert runner.batches == [["urgent"]]
        runner.batches.clear()
        futures = b.submit_many(_bulk(6), priority=-1)
        for f in futures:
            f.result(timeout=5)
    assert runner.sizes() == [2, 2, 2]


def test_an_interactive_item_joins_a_gathering_bulk_batch_which_then_runs_at_once() -> None:
    runner = Gated()
    runner.running.set()  # no gate: every batch runs as it comes
    with Batcher(runner, BatchPolicy(max_batch_size=16, max_wait_s=10.0)) as b:
        bulk = b.submit_many(_bulk(3), priority=-1)
        time.sleep(0.1)  # the batch is gathering: 3 of 16, up to 10 s to fill
        started = time.monotonic()
        urgent = b.submit("urgent", priority=3)
        assert urgent.result(timeout=5).batch_size == 4
        assert time.monotonic() - started < 2.0  # not the 10 s the bulk batch would have waited
        for f in bulk:
            f.result(timeout=5)
    assert runner.batches == [["bulk0", "bulk1", "bulk2", "urgent"]]


def test_interactive_items_never_wait_behind_more_than_a_small_bulk_batch() -> None:
    # A bulk run keeps the queue full; interactive items come one at a time, as a user's would.
    runner = Gated(per_item_s=0.002)
    runner.running.set()
    policy = BatchPolicy(max_batch_size=16, max_wait_s=0.005, busy_window_s=5.0)
    stop = threading.Event()
    with Batcher(runner, policy) as b:

        def feed_bulk() -> None:
            n = 0
            while not stop.is_set():
                pending = b.submit_many(_bulk(32, n), priority=-1)
                n += 32
                wait(pending[:16], timeout=5)  # keep about two batches queued

        feeder = threading.Thread(target=feed_bulk)
        feeder.start()
        try:
            time.sleep(0.1)
            for i in range(10):
                b.submit(f"user{i}", priority=0).result(timeout=5)
                time.sleep(0.02)
        finally:
            stop.set()
            feeder.join(10)
    order = runner.batches
    with_user = [i for i, batch in enumerate(order) if any(x.startswith("user") for x in batch)]
    assert len(with_user) == 10
    assert max(len(order[i]) for i in range(with_user[0])) == 16  # bulk alone ran full before the first
    for i in with_user[1:]:  # once interactive items come, the batch before each holds at most 16 // 8 rows
        bulk_before = [x for x in order[i - 1] if x.startswith("bulk")]
        assert len(bulk_before) <= 2, order[i - 1]
