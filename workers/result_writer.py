"""Writes finished jobs back: Celery-format results and acknowledgements, many jobs per
Redis round trip.

Each outcome becomes what Celery's Redis result backend would write (``celery-task-meta-ID``
with ``SETEX`` and a ``PUBLISH`` on the same key, which ``AsyncResult.get()`` listens to),
and the acknowledgement kombu would make (the delivery tag removed from ``unacked`` and
``unacked_index``), all in one ``MULTI``: a job is acknowledged exactly when its result is
written, never before. While Redis is away the batch is kept and tried again; the jobs stay
in kombu's unacked structures meanwhile, so a crash then loses nothing.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from shared import dead_letters
from shared.dead_letters import DeadLetter, raw_message_text
from workers.envelope import Envelope
from workers.task_events import TaskEvents

log = logging.getLogger(__name__)

RESULT_KEY_PREFIX = "celery-task-meta-"
UNACKED_KEY = "unacked"  # kombu's default key names
UNACKED_INDEX_KEY = "unacked_index"

# A write of fewer results than this waits COALESCE_S for more: per-write costs (a MULTI,
# an event message) dominate when results trickle in one by one.
COALESCE_BELOW = 16
COALESCE_S = 0.001

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@dataclass(slots=True)
class Outcome:
    env: Envelope
    state: str  # SUCCESS, FAILURE or REVOKED; "" to acknowledge without writing (a duplicate)
    result: Any = None  # the result body, or the exception
    runtime: float = 0.0
    dead_letter: str | None = None  # a reason: the message also goes to the dead-letter queue
    key: int = 0  # the ingest's handle on the job it held (0: none)


def exception_result(exc: BaseException) -> dict[str, Any]:
    """An exception as Celery's JSON backend stores it (``exception_to_python`` reads it back)."""
    cls = type(exc)
    return {"exc_type": cls.__qualname__, "exc_message": [str(a) for a in exc.args], "exc_module": cls.__module__}


class ResultWriter:
    def __init__(
        self,
        client: redis.Redis,
        hostname: str,
        result_ttl_s: int,
        events: TaskEvents,
        on_written: Callable[[list[Outcome]], None],
    ) -> None:
        self.client = client
        self.hostname = hostname
        self.ttl = result_ttl_s
        self.events = events
        self.on_written = on_written
        self._queue: deque[Outcome] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="result-writer", daemon=True)

    def start(self) -> ResultWriter:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def put(self, outcome: Outcome) -> None:
        self._queue.append(outcome)  # deque.append is atomic: any thread may call this
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._queue)

    def _loop(self) -> None:
        backoff = 0.05
        batch: list[Outcome] = []
        while True:
            if not batch:
                self._wake.wait(0.5)
                self._wake.clear()
                if 0 < len(self._queue) < COALESCE_BELOW and not self._stop.is_set():
                    time.sleep(COALESCE_S)  # a few more results share the round trip, for 1 ms
                while self._queue and len(batch) < 1024:
                    batch.append(self._queue.popleft())
            if batch:
                try:
                    self.write(batch)
                except redis.RedisError as exc:  # Redis away: keep the batch, try again
                    log.warning("writing %d results failed (%s); retrying in %.1fs", len(batch), exc, backoff)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                backoff = 0.05
                self.events.flush()
                self.on_written(batch)
                batch = []
            elif self._stop.is_set():
                return

    def write(self, batch: list[Outcome]) -> None:
        done = datetime.now(UTC).isoformat()
        pipe = self.client.pipeline(transaction=True)
        for o in batch:
            env = o.env
            if o.state and env.id:
                value = _dumps(self._meta(o, done))
                key = RESULT_KEY_PREFIX + env.id
                pipe.set(key, value, ex=self.ttl)
                pipe.publish(key, value)
            if o.dead_letter is not None:
                _dead_letter(pipe, env, o.dead_letter)
            if env.tag:
                pipe.zrem(UNACKED_INDEX_KEY, env.tag)
                pipe.hdel(UNACKED_KEY, env.tag)
        pipe.execute()
        if any(o.dead_letter is not None for o in batch):
            dead_letters.trim(self.client)  # bounded: a flood of garbage cannot fill Redis

    def _meta(self, o: Outcome, done: str) -> dict[str, Any]:
        env = o.env
        failed = isinstance(o.result, BaseException)
        return {
            "status": o.state,
            "result": exception_result(o.result) if failed else o.result,
            "traceback": None,
            "children": [],
            "date_done": done,
            "task_id": env.id,
            # result_extended: what `conveyor status ID` and Flower show beside the result.
            "name": env.task,
            "args": env.args,
            "kwargs": env.kwargs,
            "worker": self.hostname,
            "retries": env.retries,
            "queue": env.queue,
        }


def _dead_letter(pipe: Any, env: Envelope, reason: str) -> None:
    letter = DeadLetter(
        id=env.id or env.tag or f"raw-{time.time_ns()}",
        queue=env.queue or "",
        task=env.task,
        reason=reason,
        retries=env.retries,
        message=raw_message_text(env.raw),
    )
    dead_letters.add(pipe, letter)
