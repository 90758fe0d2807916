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
from functools import partial
from typing import Any

import redis
from celery.utils.saferepr import saferepr

from shared import dead_letters
from shared.dead_letters import DeadLetter, raw_message_text
from shared.names import DELIVERIES_KEY_PREFIX
from shared.replication import wait_for_replicas
from shared.wire_text import printable, wire_bytes
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

# A result's args and kwargs (result_extended) are kept whole up to this size; past it they are
# kept as a truncated repr, as Celery's argsrepr: a 10 MB job is not written back twice.
MAX_ARGS_CHARS = 64 * 1024
ARGSREPR_CHARS = 1024
# A result larger than this is replaced by a FAILURE saying so: one job cannot fill Redis.
MAX_RESULT_CHARS = 64 * 1024 * 1024

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_dumps_ascii = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode


def encode_json(value: Any) -> bytes:
    """JSON as UTF-8 bytes; a string that is not valid Unicode is written as its \\u escape
    (valid JSON, ASCII) instead of raising."""
    text = _dumps(value)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _dumps_ascii(value).encode("ascii")


@dataclass(slots=True)
class Outcome:
    env: Envelope
    state: str  # SUCCESS, FAILURE or REVOKED; "" to acknowledge without writing (a duplicate)
    result: Any = None  # the result body, or the exception
    runtime: float = 0.0
    dead_letter: str | None = None  # a reason: the message also goes to the dead-letter queue
    key: int = 0  # the ingest's handle on the job it held (0: none)
    requeue: bool = False  # put the message back at the head of its list instead (no result)


def exception_result(exc: BaseException) -> dict[str, Any]:
    """An exception as Celery's JSON backend stores it (``exception_to_python`` reads it back)."""
    cls = type(exc)
    return {
        "exc_type": cls.__qualname__,
        "exc_message": [printable(str(a), 4000) for a in exc.args],
        "exc_module": cls.__module__,
    }


class ResultWriter:
    def __init__(
        self,
        client: redis.Redis,
        hostname: str,
        result_ttl_s: int,
        events: TaskEvents,
        on_written: Callable[[list[Outcome]], None],
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
    ) -> None:
        self.client = client
        self.hostname = hostname
        self.ttl = result_ttl_s
        self.wait_replicas, self.wait_timeout_ms = wait_replicas, wait_timeout_ms
        self.events = events
        self.on_written = on_written
        self._queue: deque[Outcome] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="result-writer", daemon=True)
        self.beat = time.monotonic()  # when the loop last turned
        self.written_at = time.monotonic()  # when results were last written

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

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        backoff = 0.05
        batch: list[Outcome] = []
        while True:
            self.beat = time.monotonic()
            if not batch:
                self._wake.wait(0.5)
                self._wake.clear()
                if 0 < len(self._queue) < COALESCE_BELOW and not self._stop.is_set():
                    time.sleep(COALESCE_S)  # a few more results share the round trip, for 1 ms
                while self._queue and len(batch) < 1024:
                    batch.append(self._queue.popleft())
            if batch:
                try:
                    self._write_isolated(batch)
                except redis.RedisError as exc:  # Redis away: keep the batch, try again
                    log.warning("writing %d results failed (%s); retrying in %.1fs", len(batch), exc, backoff)
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                backoff = 0.05
                self.written_at = time.monotonic()
                self._after_write(batch)
                batch = []
            elif self._stop.is_set():
                return

    def _after_write(self, batch: list[Outcome]) -> None:
        for after in (self.events.flush, partial(self.on_written, batch)):
            try:
                after()
            except Exception:  # watching and bookkeeping must never stop the writes
                log.exception("after writing %d results", len(batch))

    def _write_isolated(self, batch: list[Outcome]) -> None:
        """``write``, where an outcome that cannot be written (anything but Redis being away)
        fails that job alone: it is written as a FAILURE that says so, or at least acknowledged
        and dead-lettered. One job can never stop the writer."""
        try:
            self.write(batch)
            return
        except redis.RedisError:
            raise
        except Exception:
            log.exception("writing a batch of %d results failed; writing them one by one", len(batch))
        for outcome in batch:
            try:
                self.write([outcome])
                continue
            except redis.RedisError:
                raise
            except Exception as exc:
                error = RuntimeError(f"the result could not be written ({type(exc).__name__}: {printable(str(exc))})")
            stripped = Envelope(outcome.env.raw, tag=outcome.env.tag, id=outcome.env.id, task=outcome.env.task)
            stripped.queue, stripped.list_key = outcome.env.queue, outcome.env.list_key
            state = "FAILURE" if outcome.state else ""
            fallback = Outcome(stripped, state, error, dead_letter=str(error), key=outcome.key)
            try:
                self.write([fallback])
            except redis.RedisError:
                raise
            except Exception:
                log.exception("could not write even the failure of job %s", printable(outcome.env.id or "?"))

    def write(self, batch: list[Outcome]) -> None:
        done = datetime.now(UTC).isoformat()
        pipe = self.client.pipeline(transaction=True)
        for o in batch:
            env = o.env
            if o.requeue:
                if env.list_key is not None:  # back at the head of the list it came from
                    pipe.rpush(env.list_key, wire_bytes(env.raw))
            elif o.state and env.id:
                value = self._value(o, done)
                key = RESULT_KEY_PREFIX.encode() + wire_bytes(env.id)
                pipe.set(key, value, ex=self.ttl)
                pipe.publish(key, value)
                if env.deliveries > 1:
                    pipe.delete(DELIVERIES_KEY_PREFIX.encode() + wire_bytes(env.id))
            if o.dead_letter is not None:
                _dead_letter(pipe, env, o.dead_letter)
            if env.tag:
                pipe.zrem(UNACKED_INDEX_KEY, env.tag)
                pipe.hdel(UNACKED_KEY, env.tag)
        pipe.execute()
        if self.wait_replicas:
            self._confirm_replicated(len(batch))
        if any(o.dead_letter is not None for o in batch):
            dead_letters.trim(self.client)  # bounded: a flood of garbage cannot fill Redis

    def _confirm_replicated(self, n: int) -> None:
        # The results and acknowledgements are one transaction, replicated in order: a failover
        # that loses them loses both, and the job runs again. WAIT narrows that window to zero
        # for what the writer has moved past (a reader may still have seen a result on the old master).
        got = wait_for_replicas(self.client, self.wait_replicas, self.wait_timeout_ms)
        if got < self.wait_replicas:
            log.warning("%d results reached %d of %d replicas within %d ms", n, got, self.wait_replicas,
                        self.wait_timeout_ms)  # fmt: skip

    def _value(self, o: Outcome, done: str) -> bytes:
        meta = self._meta(o, done)
        value = encode_json(meta)
        if len(value) > MAX_ARGS_CHARS:
            # Kept whole only while small: past that, as Celery's argsrepr (a bounded repr).
            meta["args"] = saferepr(o.env.args, maxlen=ARGSREPR_CHARS)
            meta["kwargs"] = saferepr(o.env.kwargs, maxlen=ARGSREPR_CHARS)
            value = encode_json(meta)
        if len(value) > MAX_RESULT_CHARS:
            meta["status"] = "FAILURE"
            meta["result"] = exception_result(
                RuntimeError(f"the result is {len(value)} bytes, over the {MAX_RESULT_CHARS}-byte limit")
            )
            value = encode_json(meta)
        return value

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
    letter = DeadLetter.bounded(
        id=env.id or env.tag or f"raw-{time.time_ns()}",
        queue=env.queue or "",
        task=env.task,
        reason=reason,
        retries=env.retries,
        message=raw_message_text(env.raw),
    )
    dead_letters.add(pipe, letter)
