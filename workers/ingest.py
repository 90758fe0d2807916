"""Bulk ingest: inference jobs taken from Redis many at a time, inside the Celery worker.

Celery's per-task path (a pool thread per job, three events, a result write that reads
before it writes, an ack, each message decoded on its own) costs milliseconds of Python per
job; the model needs microseconds per short text. So inference workers take their queues'
messages themselves, in the worker process Celery started:

- one Lua call pops up to N messages across the inference queues, most urgent first
  (every priority of the interactive queues, then the bulk queues), and registers each in
  kombu's ``unacked``/``unacked_index`` in the same atomic step, exactly as kombu's own
  delivery does, so a SIGKILLed worker's jobs come back through kombu's visibility-timeout
  restore. A message that is not even a JSON object goes straight to the dead-letter queue
  in that step: nothing is ever dropped, and nothing malformed can stop the loop.
- the batch of messages is decoded and validated together, and checked against cancels,
  revokes and finished results in one round trip, then handed to the runtime's batchers;
- results are written and acknowledged together by the ``ResultWriter``.

N is bounded by what the next batches need (``prefetch_items``), so a priority-9 job sent
behind a deep backlog starts within a batch or two. Training jobs keep Celery's path.
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
import time
from collections.abc import Callable, Container, Sequence
from datetime import UTC, datetime
from typing import Any

import redis
from pydantic import ValidationError

from shared import dead_letters
from shared.errors import ConveyorError, InvalidJob, JobCancelled, JobExpired, describe_validation_error
from shared.jobs import ClassifyJob, JobBase, RecommendJob, TranscribeJob
from shared.names import CANCEL_KEY_PREFIX, DEAD_LETTER_KEY, DEAD_LETTER_ORDER_KEY, TASKS, priority_list
from workers.envelope import Envelope, decode
from workers.result_writer import RESULT_KEY_PREFIX, UNACKED_INDEX_KEY, UNACKED_KEY, Outcome, ResultWriter
from workers.runtime import Runtime
from workers.task_events import TaskEvents

log = logging.getLogger(__name__)

_IDLE_FIRST_S = 0.0005
_COALESCE_BELOW = 16
_COALESCE_S = 0.001
# Bulk messages held at once: two, so the next chunk is tokenized and queued while one runs.
BULK_IN_FLIGHT = 2
CELERY_PRIORITIES = range(10)  # Celery on Redis serves 0 first

JOB_MODELS: dict[str, type[JobBase]] = {"classify": ClassifyJob, "transcribe": TranscribeJob, "recommend": RecommendJob}
TASK_TYPES: dict[str, str] = {TASKS[t]: t for t in JOB_MODELS}

# KEYS: unacked, unacked_index, dead-letter hash, dead-letter order. The lists, in the order
# they are served (interactive, then bulk), and their queues are written into the script
# (``pop_script``): packing 60 key names into every call cost more than the pop itself.
# ARGV: most interactive messages, now, how many of the lists are interactive, most bulk
# messages.
# Returns tag, message pairs; a tag of "" means the message was dead-lettered (then the
# second element is the dead letter's id).
POP_SCRIPT = r"""
local n = tonumber(ARGV[1])
local now = tonumber(ARGV[2])
local LISTS = {--LISTS--}
local QUEUES = {--QUEUES--}
local nlists = #LISTS
local out = {}
local function take(m, qname)
  local ok, msg = pcall(cjson.decode, m)
  if not ok or type(msg) ~= 'table' then
    local id = 'undecodable-' .. redis.call('INCR', KEYS[3] .. ':seq')
    -- The entry must be valid JSON whatever the bytes: each byte >= 0x80 is written as a
    -- surrogate escape (Python reads it back byte for byte with 'surrogateescape').
    local raw = (string.gsub(cjson.encode(m), '[\128-\255]', function(c)
      return string.format('\\udc%02x', string.byte(c)) end))
    redis.call('HSET', KEYS[3], id, '{"id":' .. cjson.encode(id) .. ',"queue":' .. cjson.encode(qname) ..
      ',"reason":"not a Celery message: not a JSON object","failed_at":' .. now .. ',"retries":0,"message":' ..
      raw .. '}')
    redis.call('ZADD', KEYS[4], now, id)
    table.insert(out, '')
    table.insert(out, id)
    return
  end
  local tag, ex, rk = nil, '', qname
  local props = msg['properties']
  if type(props) == 'table' then
    if type(props['delivery_tag']) == 'string' and props['delivery_tag'] ~= '' then tag = props['delivery_tag'] end
    local di = props['delivery_info']
    if type(di) == 'table' then
      if type(di['exchange']) == 'string' then ex = di['exchange'] end
      if type(di['routing_key']) == 'string' then rk = di['routing_key'] end
    end
  end
  if not tag or redis.call('HEXISTS', KEYS[1], tag) == 1 then
    tag = 'conveyor-' .. redis.call('INCR', KEYS[1] .. ':conveyor-seq')
  end
  redis.call('ZADD', KEYS[2], now, tag)
  redis.call('HSET', KEYS[1], tag, '[' .. m .. ',' .. cjson.encode(ex) .. ',' .. cjson.encode(rk) .. ']')
  table.insert(out, tag)
  table.insert(out, m)
end
local interactive = tonumber(ARGV[3])
local nbulk = tonumber(ARGV[4])
for i = 1, interactive do
  local want = n - #out / 2
  if want <= 0 then break end
  local got = redis.call('RPOP', LISTS[i], want)
  if got then
    for _, m in ipairs(got) do take(m, QUEUES[i]) end
  end
end
-- Bulk messages (many rows each) only when no interactive job waits.
if nbulk > 0 and #out == 0 then
  local waiting = false
  if n <= 0 then
    for i = 1, interactive do
      if redis.call('EXISTS', LISTS[i]) == 1 then waiting = true break end
    end
  end
  if not waiting then
    for i = interactive + 1, nlists do
      while nbulk > 0 do
        local m = redis.call('RPOP', LISTS[i])
        if not m then break end
        take(m, QUEUES[i])
        nbulk = nbulk - 1
      end
      if nbulk <= 0 then break end
    end
  end
end
return out
"""


def _lua_string(value: str) -> str:
    # Lua decimal escapes take up to three digits: byte 22 then "3" must be "\\0223", not "\\223".
    return (
        '"' + "".join(chr(b) if 32 <= b < 127 and chr(b) not in '"\\' else f"\\{b:03d}" for b in value.encode()) + '"'
    )


def pop_script(lists: Sequence[tuple[str, str]]) -> str:
    """The pop script for these (list key, queue) pairs, served in this order."""
    return POP_SCRIPT.replace("--LISTS--", ", ".join(_lua_string(key) for key, _ in lists)).replace(
        "--QUEUES--", ", ".join(_lua_string(queue) for _, queue in lists)
    )


def served_lists(queues: Sequence[str], bulk: Sequence[str]) -> list[tuple[str, str]]:
    """(list key, queue) in the order they are served: each priority across the interactive
    queues, most urgent first, then the bulk queues the same way."""
    order: list[tuple[str, str]] = []
    for group in (queues, bulk):
        for pri in CELERY_PRIORITIES:
            for queue in group:
                order.append((priority_list(queue, pri), queue))
    return order


def job_data(args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The job's JSON object from a task's arguments: one positional object, ``job=``, or plain
    keyword arguments, so any Celery-speaking client can send one."""
    if args:
        if len(args) != 1 or kwargs:
            raise InvalidJob("send the job as one JSON object (one positional argument, or job=...)")
        data = args[0]
    elif set(kwargs) == {"job"}:
        data = kwargs["job"]
    else:
        data = kwargs
    if not isinstance(data, dict):
        raise InvalidJob(f"the job must be a JSON object, got {type(data).__name__}")
    return data


def validate_job(model: type[JobBase], data: dict[str, Any], task_id: str | None) -> JobBase:
    if task_id is not None and "id" not in data:
        data = {**data, "id": task_id}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidJob(f"invalid {model.__name__}: {describe_validation_error(exc)}") from None


def item_count(job: JobBase) -> int:
    if isinstance(job, ClassifyJob):
        return len(job.texts)
    if isinstance(job, RecommendJob):
        return len(job.users)
    return 1


class InFlight:
    """One job the worker holds; also what ``celery inspect active`` lists for it."""

    __slots__ = ("env", "job_type", "job", "items", "received", "started", "attempts", "bulk", "__weakref__")

    def __init__(self, env: Envelope, job_type: str, job: JobBase, received: float, bulk: bool = False) -> None:
        self.env, self.job_type, self.job, self.bulk = env, job_type, job, bulk
        self.items = item_count(job)
        self.received = received
        self.started = time.monotonic()
        self.attempts = 0

    @property
    def id(self) -> str | None:
        return self.env.id

    def info(self, safe: bool = False) -> dict[str, Any]:
        env = self.env
        return {
            "id": env.id, "name": env.task, "args": env.args, "kwargs": env.kwargs, "type": env.task,
            "hostname": None, "time_start": self.received, "acknowledged": False,
            "delivery_info": {"routing_key": env.queue, "priority": env.priority, "redelivered": False},
            "worker_pid": None,
        }  # fmt: skip


class Ingest:
    def __init__(
        self,
        client: redis.Redis,
        runtime: Runtime,
        writer_client: redis.Redis,
        events: TaskEvents,
        *,
        hostname: str,
        queues: Sequence[str],
        bulk_queues: Sequence[str],
        prefetch_items: int,
        result_ttl_s: int,
        time_limit_s: float,
        max_retries: int,
        retry_backoff_s: float,
        idle_poll_s: float = 0.005,
        revoked: Container[str] = frozenset(),
        on_active: Callable[[InFlight, bool], None] | None = None,
        on_outcome: Callable[[InFlight | None, Outcome], None] | None = None,
        on_retry: Callable[[InFlight], None] | None = None,
    ) -> None:
        self.client = client
        self.runtime = runtime
        self.events = events
        self.hostname = hostname
        self.prefetch_items = max(1, prefetch_items)
        self.time_limit_s = time_limit_s
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.idle_poll_s = max(_IDLE_FIRST_S, idle_poll_s)
        self.revoked = revoked
        self.on_active = on_active
        self.on_outcome = on_outcome
        self.on_retry = on_retry
        lists = served_lists(queues, bulk_queues)
        self._interactive = len(queues) * len(CELERY_PRIORITIES)
        self._bulk_queues = frozenset(bulk_queues)
        self._keys = [UNACKED_KEY, UNACKED_INDEX_KEY, DEAD_LETTER_KEY, DEAD_LETTER_ORDER_KEY]
        self._pop = client.register_script(pop_script(lists))
        self.writer = ResultWriter(writer_client, hostname, result_ttl_s, events, self._written)
        self._inflight: dict[int, InFlight] = {}  # id(job) -> entry
        self._items = 0  # items of the interactive jobs held, until their results are written
        self._bulk = 0  # bulk messages held: at most BULK_IN_FLIGHT, so one is ready when one ends
        self._room = threading.Condition()
        self._retries: list[tuple[float, int, InFlight]] = []  # (due, seq, entry), a heap
        self._seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ingest", daemon=True)
        self.beat = time.monotonic()  # when the pull loop last turned: the worker's liveness

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> Ingest:
        self.writer.start()
        self._thread.start()
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """Stop taking jobs, let the held ones finish and be written (up to ``timeout``), then
        put any still unfinished back on their queues."""
        self._stop.set()
        with self._room:
            self._room.notify_all()
        self._thread.join(timeout)
        deadline = time.monotonic() + timeout
        while (self._inflight or self.writer.pending) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.writer.stop()
        left = [e.env for e in list(self._inflight.values())]
        if left:
            self._requeue(left)

    # -- what the lease keeper renews ---------------------------------------------------------------
    def held_tags(self) -> list[str]:
        """Delivery tags of the jobs really running here; a job past its time limit is given up
        (its lease lapses and kombu redelivers it), never held forever."""
        now = time.monotonic()
        tags = []
        for key, entry in list(self._inflight.items()):
            if now - entry.started > self.time_limit_s:
                log.error(
                    "job %s ran past the %.0fs time limit; releasing it for redelivery", entry.id, self.time_limit_s
                )
                if self._inflight.pop(key, None) is not None:
                    self._release([entry])
                    if self.on_active is not None:
                        self.on_active(entry, False)
                continue
            if entry.env.tag:
                tags.append(entry.env.tag)
        return tags

    @property
    def held(self) -> int:
        return len(self._inflight)

    # -- the pull loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        # Redis has no blocking pop across many lists that leaves the message safe until it is
        # filed as unacked (a worker frozen inside BRPOP would take one message with it), so an
        # idle worker polls: the Lua call is cheap, and the wait grows from 0.5 ms to
        # CONVEYOR_IDLE_POLL_MS while nothing comes.
        backoff = 0.1
        idle = _IDLE_FIRST_S
        while not self._stop.is_set():
            self.beat = time.monotonic()
            try:
                self._due_retries()
                room, bulk_room = self._wait_for_room()
                if room <= 0 and bulk_room <= 0:
                    continue
                pairs = self._pop_messages(room, bulk_room)
                backoff = 0.1
            except redis.RedisError as exc:  # Redis away: wait, reconnect, go on
                log.warning("ingest: Redis error (%s); retrying in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if not pairs:
                self._stop.wait(idle)
                idle = min(idle * 2, self.idle_poll_s)
                continue
            idle = _IDLE_FIRST_S
            try:
                self._dispatch(pairs)
            except Exception:  # never let one bulk stop the loop; its jobs stay unacked and come back
                log.exception("ingest: dispatch failed")
            if len(pairs) < min(room, _COALESCE_BELOW):
                # Jobs trickling in: let a few gather for 1 ms rather than pay a pop for each one.
                self._stop.wait(_COALESCE_S)

    def _wait_for_room(self) -> tuple[int, int]:
        with self._room:
            while self._items >= self.prefetch_items and self._bulk >= BULK_IN_FLIGHT and not self._stop.is_set():
                self._room.wait(0.5)
                self.beat = time.monotonic()  # waiting for the batches to make room is alive
            if self._stop.is_set():
                return 0, 0
            return self.prefetch_items - self._items, BULK_IN_FLIGHT - self._bulk

    def _pop_messages(self, room: int, bulk_room: int) -> list[tuple[str, str]]:
        args: list[str | int | float] = [max(0, room), time.time(), self._interactive, max(0, bulk_room)]
        raw = self._pop(keys=self._keys, args=args)
        pairs = []
        for i in range(0, len(raw), 2):
            tag, msg = raw[i], raw[i + 1]
            pairs.append((_text(tag), _text(msg)))
        return pairs

    def _dispatch(self, pairs: list[tuple[str, str]]) -> None:
        received = time.time()
        envs: list[Envelope] = []
        if any(not tag for tag, _ in pairs):
            dead_letters.trim(self.client)  # the pop script added some: keep the store bounded
        for tag, msg in pairs:
            if not tag:
                log.warning("a message that is not a JSON object was moved to the dead-letter queue as %s", msg)
                if self.on_outcome is not None:
                    self.on_outcome(None, Outcome(Envelope(""), "", dead_letter="not a JSON object"))
                continue
            env = decode(msg)
            env.tag = tag  # the script may have given a message without one a tag of its own
            envs.append(env)
        if not envs:
            return
        finished, cancelled = self._lookups([e.id for e in envs if e.ok and e.id])
        jobs: list[JobBase] = []
        for env in envs:
            try:
                entry = self._admit(env, received, finished, cancelled)
            except ConveyorError as exc:
                self._finish_early(env, exc)
                continue
            if entry is None:
                continue
            self._inflight[id(entry.job)] = entry
            self._hold(entry)
            if self.on_active is not None:
                self.on_active(entry, True)
            if env.id is not None and env.task is not None:
                self.events.received(env.id, env.task, env.args, env.kwargs, env.retries, received)
            jobs.append(entry.job)
        if jobs:
            self.runtime.submit(jobs, self._done, self._urgency)

    def _urgency(self, job: JobBase) -> float:
        """Bulk rows wait behind every interactive item in the batchers, not only in Redis."""
        entry = self._inflight.get(id(job))
        if entry is not None and entry.bulk:
            return -1.0
        return float(job.priority)

    def _lookups(self, ids: list[str]) -> tuple[set[str], set[str]]:
        """Jobs already finished (a redelivered duplicate) and jobs cancelled: one round trip."""
        if not ids:
            return set(), set()
        pipe = self.client.pipeline(transaction=False)
        pipe.mget([RESULT_KEY_PREFIX + i for i in ids])
        pipe.mget([CANCEL_KEY_PREFIX + i for i in ids])
        results, cancels = pipe.execute()
        finished = {i for i, r in zip(ids, results) if r is not None and b'"status":"SUCCESS"' in r.replace(b" ", b"")}
        cancelled = {i for i, c in zip(ids, cancels) if c is not None}
        return finished, cancelled

    def _admit(self, env: Envelope, received: float, finished: set[str], cancelled: set[str]) -> InFlight | None:
        if not env.ok:
            raise _Refused(env.error or "malformed message")
        job_type = TASK_TYPES.get(env.task or "")
        if job_type is None:
            raise _Refused(f"task {env.task!r} is not served by inference workers (queue {env.queue!r})")
        assert env.id is not None
        if env.id in finished:  # redelivered after its result was written: acknowledge, do not run again
            self.writer.put(Outcome(env, ""))
            return None
        if env.id in cancelled or env.id in self.revoked:
            raise JobCancelled(f"job {env.id} was cancelled before it ran")
        if env.expires is not None and _passed(env.expires):
            raise JobExpired(f"job {env.id} expired at {env.expires} before it ran")
        job = validate_job(JOB_MODELS[job_type], job_data(env.args, env.kwargs), env.id)
        return InFlight(env, job_type, job, received, bulk=env.queue in self._bulk_queues)

    def _finish_early(self, env: Envelope, exc: ConveyorError) -> None:
        dead = str(exc) if isinstance(exc, _Refused) else None
        error: BaseException = InvalidJob(str(exc)) if isinstance(exc, _Refused) else exc
        state = "REVOKED" if isinstance(exc, JobCancelled) else "FAILURE"
        if env.id is not None:
            self.events.failed(env.id, error, env.task)
        outcome = Outcome(env, state if env.id else "", error, dead_letter=dead)
        if self.on_outcome is not None:
            self.on_outcome(None, outcome)
        self.writer.put(outcome)

    # -- completion -----------------------------------------------------------------------------------
    def _done(self, job: JobBase, out: dict[str, Any] | BaseException) -> None:
        entry = self._inflight.get(id(job))
        if entry is None:
            return  # given up after its time limit: its redelivery will write the result
        runtime = time.monotonic() - entry.started
        env = entry.env
        if isinstance(out, BaseException):
            if getattr(out, "retryable", False) and entry.attempts < self.max_retries:
                entry.attempts += 1
                env.retries += 1
                self._schedule_retry(entry)
                return
            self.events.failed(env.id or "", out, env.task)
            dead = f"failed after {entry.attempts} retries: {out}" if getattr(out, "retryable", False) else None
            outcome = Outcome(env, "FAILURE", out, runtime, dead_letter=dead, key=id(job))
        else:
            self.events.succeeded(env.id or "", out, runtime)
            outcome = Outcome(env, "SUCCESS", out, runtime, key=id(job))
        if self.on_outcome is not None:
            self.on_outcome(entry, outcome)
        self.writer.put(outcome)

    def _schedule_retry(self, entry: InFlight) -> None:
        # Exponential backoff with full jitter; the job stays held (and leased) meanwhile.
        delay = random.uniform(0, self.retry_backoff_s * 2 ** (entry.attempts - 1))
        log.warning("job %s failed transiently; retry %d in %.2fs", entry.id, entry.attempts, delay)
        if self.on_retry is not None:
            self.on_retry(entry)
        with self._room:
            self._seq += 1
            heapq.heappush(self._retries, (time.monotonic() + delay, self._seq, entry))

    def _due_retries(self) -> None:
        now = time.monotonic()
        due: list[InFlight] = []
        with self._room:
            while self._retries and self._retries[0][0] <= now:
                due.append(heapq.heappop(self._retries)[2])
        if due:
            self.runtime.submit([e.job for e in due], self._done, self._urgency)

    def _written(self, batch: list[Outcome]) -> None:
        freed = []
        for outcome in batch:
            if not outcome.key:
                continue
            entry = self._inflight.pop(outcome.key, None)
            if entry is not None:
                freed.append(entry)
                if self.on_active is not None:
                    self.on_active(entry, False)
        if freed:
            self._release(freed)

    def _hold(self, entry: InFlight) -> None:
        with self._room:
            if entry.bulk:
                self._bulk += 1
            else:
                self._items += entry.items

    def _release(self, entries: list[InFlight]) -> None:
        with self._room:
            for entry in entries:
                if entry.bulk:
                    self._bulk = max(0, self._bulk - 1)
                else:
                    self._items = max(0, self._items - entry.items)
            self._room.notify_all()

    # -- shutdown ---------------------------------------------------------------------------------------
    def _requeue(self, envs: list[Envelope]) -> None:
        """Put unfinished jobs back at the head of their queues, as kombu does at shutdown."""
        pipe = self.client.pipeline(transaction=True)
        for env in envs:
            queue = env.queue or ""
            pri = env.priority if env.priority in CELERY_PRIORITIES else 0
            pipe.rpush(priority_list(queue, pri), env.raw)
            if env.tag:
                pipe.zrem(UNACKED_INDEX_KEY, env.tag)
                pipe.hdel(UNACKED_KEY, env.tag)
        try:
            pipe.execute()
        except redis.RedisError as exc:  # they stay unacked: the visibility timeout brings them back
            log.warning("could not requeue %d jobs at shutdown: %s", len(envs), exc)


class _Refused(InvalidJob):
    """A message that can never run (malformed, unknown task): failed and dead-lettered."""


def _passed(expires: str) -> bool:
    try:
        when = datetime.fromisoformat(expires)
    except ValueError:
        return False
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return datetime.now(UTC) > when


def _text(value: Any) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)
