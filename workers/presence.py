"""A worker's own entry in Redis (``shared/worker_presence.py``): who it is, its device, queues
and loaded models, how many jobs it holds, batches per second, jobs done. Written by a daemon
thread every couple of seconds; counting on the hot path is a lock and two additions. If Redis
is away the entry is simply late (the reader shows the heartbeat's age)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Literal, Self

import redis

from shared.worker_presence import FORGET_AFTER_S, PRESENCE_EVERY_S, PRESENCE_KEY, WorkerPresence

log = logging.getLogger("conveyor.presence")


class Presence:
    def __init__(
        self,
        client: redis.Redis,
        hostname: str,
        role: Literal["inference", "training"],
        device: Callable[[], str],
        queues: list[str],
        models: Callable[[], list[str]] = list,
        held: Callable[[], int] = lambda: 0,
        every_s: float = PRESENCE_EVERY_S,
    ) -> None:
        self.client = client
        self.hostname = hostname
        self.role = role
        self._device = device
        self.queues = queues
        self._models = models
        self._held = held
        self.every_s = every_s
        self.started_at = time.time()
        self._lock = threading.Lock()
        self.batches = self.items = self.succeeded = self.failed = 0
        self._last = (time.monotonic(), 0)  # (when, batches) at the previous entry
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def batch(self, size: int) -> None:
        with self._lock:
            self.batches += 1
            self.items += size

    def job(self, state: str) -> None:
        with self._lock:
            if state == "SUCCESS":
                self.succeeded += 1
            elif state == "FAILURE":
                self.failed += 1

    def entry(self) -> WorkerPresence:
        now = time.monotonic()
        with self._lock:
            batches, items, ok, failed = self.batches, self.items, self.succeeded, self.failed
        then, before = self._last
        self._last = (now, batches)
        rate = (batches - before) / (now - then) if now > then else 0.0
        return WorkerPresence(
            hostname=self.hostname, pid=os.getpid(), role=self.role, device=self._device(), queues=self.queues,
            models=self._models()[:64], started_at=self.started_at, beat_at=time.time(), held=self._held(),
            batches=batches, items=items, batches_per_s=round(rate, 3), succeeded=ok, failed=failed,
        )  # fmt: skip

    def write(self) -> None:
        self.client.hset(PRESENCE_KEY, self.hostname, self.entry().model_dump_json())

    def start(self) -> Self:
        self._prune()
        self._thread = threading.Thread(target=self._run, name="conveyor-presence", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.client.hdel(PRESENCE_KEY, self.hostname)  # gone on purpose: not "down"
        except (redis.RedisError, OSError):
            pass

    def _run(self) -> None:
        while True:
            try:
                self.write()
            except (redis.RedisError, OSError) as exc:
                log.debug("presence entry not written: %s", exc)
            except Exception:  # watching must never take the worker down
                log.exception("presence entry failed")
            if self._stop.wait(self.every_s):
                return

    def _prune(self) -> None:
        """Drop the entries of workers that stopped beating long ago (killed, never said goodbye)."""
        try:
            cutoff = time.time() - FORGET_AFTER_S
            for name, raw in self.client.hgetall(PRESENCE_KEY).items():
                try:
                    old = WorkerPresence.model_validate_json(raw).beat_at < cutoff
                except ValueError:
                    old = True
                if old:
                    self.client.hdel(PRESENCE_KEY, name)
        except (redis.RedisError, OSError):
            pass
