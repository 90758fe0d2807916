"""Admission control at submit: a queue deeper than ``CONVEYOR_MAX_QUEUE_DEPTH`` refuses new
jobs (``QueueFull``), so a flood of jobs cannot fill Redis's memory (Triton's max queue size).

A queue's depth is the sum of its ten per-priority lists, read with one pipelined LLEN
round trip and then kept for ``cache_s``, counting this producer's own sends meanwhile: a
producer submitting in a tight loop pays one round trip per ``cache_s``, not one per job.
The bound is therefore soft by what other producers send within ``cache_s``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Final

import redis

from shared.errors import QueueFull
from shared.names import priority_lists

DEFAULT_CACHE_S: Final = 0.1


class QueueDepthGate:
    def __init__(self, client: Callable[[], redis.Redis], limit: int, cache_s: float = DEFAULT_CACHE_S) -> None:
        self._client = client  # called lazily: a Client builds its redis connection on first use
        self.limit = limit
        self.cache_s = cache_s
        self._depths: dict[str, tuple[float, int]] = {}  # queue -> (when read, depth)
        self._lock = threading.Lock()

    def admit(self, wanted: Counter[str]) -> None:
        """Raise QueueFull if any queue would hold more than the limit with ``wanted[queue]`` more jobs."""
        if not self.limit or not wanted:
            return
        depths = self.depths(list(wanted))
        for queue, n in wanted.items():
            if depths[queue] + n > self.limit:
                raise QueueFull(
                    f"queue {queue} holds {depths[queue]} jobs, at most {self.limit} allowed "
                    f"(CONVEYOR_MAX_QUEUE_DEPTH): {n} more refused; try again once workers catch up"
                )

    def sent(self, queue: str, n: int = 1) -> None:
        with self._lock:
            when, depth = self._depths.get(queue, (0.0, 0))
            self._depths[queue] = (when, depth + n)

    def depths(self, queues: list[str]) -> dict[str, int]:
        now = time.monotonic()
        with self._lock:
            stale = [q for q in queues if q not in self._depths or now - self._depths[q][0] > self.cache_s]
        if stale:
            pipe = self._client().pipeline(transaction=False)
            for queue in stale:
                for name in priority_lists(queue):
                    pipe.llen(name)
            counts = pipe.execute()
            with self._lock:
                for i, queue in enumerate(stale):
                    self._depths[queue] = (now, sum(counts[10 * i : 10 * i + 10]))
        with self._lock:
            return {q: self._depths[q][1] for q in queues}
