"""Leases on the jobs a worker holds, so the visibility timeout can stay short.

kombu's Redis transport keeps each delivered, unacknowledged message in the ``unacked``
hash with its delivery time in the ``unacked_index`` sorted set, and redelivers any whose
time is older than the visibility timeout. A worker killed with SIGKILL never acks, so its
jobs come back after that timeout; but a long job on a live worker would come back too.
This thread re-stamps the delivery time of every job the worker holds (reserved or running)
a few times per timeout: live jobs are never redelivered, a dead worker's jobs come back
within one timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

import redis

from shared.wire_text import is_text

log = logging.getLogger(__name__)

UNACKED_INDEX_KEY = "unacked_index"  # kombu's default key name


class LeaseKeeper:
    def __init__(
        self, client: redis.Redis, held_tags: Callable[[], Iterable[str]], visibility_timeout_s: float
    ) -> None:
        self.client = client
        self.held_tags = held_tags
        self.every_s = max(1.0, visibility_timeout_s / 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lease-keeper", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def alive(self) -> bool:
        return self._thread.is_alive() or self._stop.is_set()

    def renew(self) -> int:
        tags = [t for t in self.held_tags() if t and is_text(t)]
        if not tags:
            return 0
        now = time.time()
        # XX: only re-stamp entries that still exist; an acked job must not reappear.
        return int(self.client.zadd(UNACKED_INDEX_KEY, dict.fromkeys(tags, now), xx=True, ch=True) or 0)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.renew()
            except redis.RedisError as exc:  # Redis briefly away: try again next round
                log.warning("lease renewal failed: %s", exc)
            except Exception:  # anything else fails this round only: the keeper never dies
                log.exception("lease renewal failed")
