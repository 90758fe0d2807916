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

    with Batcher(run, BatchPolicy(max_batch_size=4, max_wait_s=0.0)) as b:
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
