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
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from celery.utils.saferepr import saferepr
from pydantic import ValidationError

from shared import dead_letters
from shared.celery_config import celery_priority
from shared.errors import ConveyorError, InvalidJob, JobCancelled, JobExpired, describe_validation_error
from shared.jobs import JobBase
from shared.kinds import INFERENCE_TYPES, JOB_MODELS, KINDS, by_task
from shared.names import (
    CANCEL_KEY_PREFIX,
    DEAD_LETTER_KEY,
    DEAD_LETTER_ORDER_KEY,
    DELIVERIES_KEY_PREFIX,
    TASKS,
    priority_list,
)
from shared.wire_text import printable, wire_bytes
from workers.envelope import MAX_MESSAGE_BYTES, Envelope, decode, explain_refusal, marked_redelivered, recover_id
from workers.result_writer import RESULT_KEY_PREFIX, UNACKED_INDEX_KEY, UNACKED_KEY, Outcome, ResultWriter
from workers.runtime import Runtime
from workers.task_events import TaskEvents
from workers.tenancy import claim_refusal
from workers.wakeup import SAFETY_LOOK_S, Wakeup

log = logging.getLogger(__name__)

_IDLE_FIRST_S = 0.0005
_COALESCE_BELOW = 16
_COALESCE_S = 0.001
_LIMITS_EVERY_S = 0.5  # how often the pull loop looks for jobs past their time limit
_ACCEPT_POLL_S = 0.1  # how often a refusing ``accept`` (a busy training worker) is asked again
# Bulk messages held at once: two, so the next chunk is tokenized and queued while one runs.
BULK_IN_FLIGHT = 2
CELERY_PRIORITIES = range(10)  # Celery on Redis serves 0 first
# A message that sets no priority waits with Conveyor's default (5, Celery's 4), not on the list
# of the most urgent jobs where kombu files it.
DEFAULT_CELERY_PRIORITY = celery_priority(JobBase.model_fields["priority"].default)

# A runtime's ``done`` value for a job passed on whole to Celery's own task path (training): the
# message is acknowledged here, with no result; Celery's worker writes that.
HANDED_OFF: Any = object()

# KEYS: unacked, unacked_index, dead-letter hash, dead-letter order. The lists, in the order
# they are served (interactive, then bulk), and their queues are written into the script
# (``pop_script``): packing 60 key names into every call cost more than the pop itself.
# ARGV: most interactive messages, now, how many of the lists are interactive, most bulk
# messages, how many interactive queues (the lists of one priority level).
# Returns four elements per message: its tag, the message, the index (1-based) of the list it
# came from, and a reason. A reason other than "" means the message was not filed but
# dead-lettered at intake (then the tag is the dead letter's id).
#
# Only what kombu's restore can re-publish is filed in ``unacked``: its
# ``_do_restore_message`` sets ``headers.redelivered`` and
# ``properties.delivery_info.redelivered`` and reads ``properties.priority``; anything it
# cannot do that to (an array, ``"headers": []`` or ``null``, an infinite priority), cannot
# parse (bytes that are not UTF-8, kombu's ``__type__`` markers), or would route elsewhere is
# dead-lettered here instead, where kombu would have dropped it on redelivery. A filed entry
# always names the queue the message was taken from, never the routing key it claims.
POP_SCRIPT = r"""
cjson.decode_invalid_numbers(false)  -- hex, inf and nan: Python's json (kombu's restore) refuses them
cjson.decode_max_depth(32)           -- a Celery envelope is 4 deep; its body is a string
local n = tonumber(ARGV[1])
local now = tonumber(ARGV[2])
local LISTS = {--LISTS--}
local QUEUES = {--QUEUES--}
local DEFER = {--DEFER--}  -- list index of a priority-0 list -> its queue's default-priority list
local MAX_BYTES = --MAX_BYTES--
local MAX_LETTER_BYTES = --MAX_LETTER_BYTES--
local nlists = #LISTS
local out = {}

-- Anchored patterns only: an unanchored character class costs ~20 ns a byte in Lua (it restarts
-- at every position), an anchored run ~4.
local function valid_utf8(s)
  local i = string.match(s, '^[%z\1-\127]*()')
  while i <= #s do
    local c = string.byte(s, i)
    local len, lo = 0, 128
    if c >= 194 and c <= 223 then len = 1
    elseif c >= 224 and c <= 239 then len = 2 if c == 224 then lo = 160 end
    elseif c >= 240 and c <= 244 then len = 3 if c == 240 then lo = 144 end
    else return false end
    local hi = 191
    if c == 237 then hi = 159 elseif c == 244 then hi = 143 end
    for k = 1, len do
      local b = string.byte(s, i + k)
      if not b then return false end
      if k == 1 then
        if b < lo or b > hi then return false end
      elseif b < 128 or b > 191 then return false end
    end
    i = string.match(s, '^[%z\1-\127]*()', i + len + 1)
  end
  return true
end

-- 'object', 'empty' (an object or an array: cjson cannot tell), or nil for anything else
local function shape(v)
  if type(v) ~= 'table' then return nil end
  if next(v) == nil then return 'empty' end
  if v[1] ~= nil then return nil end
  return 'object'
end

local function has_type_marker(t, depth)
  if depth > 40 then return true end
  for k, v in pairs(t) do
    if k == '__type__' then return true end
    if type(v) == 'table' and has_type_marker(v, depth + 1) then return true end
  end
  return false
end

-- The payload to file for kombu's restore, or nil and why it cannot be filed.
local function restorable(m)
  if #m > MAX_BYTES then return nil, 'larger than the ' .. MAX_BYTES .. '-byte message limit' end
  local normalize = false
  if not string.find(m, '^[ -~]*$') then  -- not all printable ASCII (kombu's own JSON is)
    if not string.find(m, '^[%z\1-\127]*$') and not valid_utf8(m) then return nil, 'not UTF-8 text' end
    -- control bytes: Python's json refuses them inside strings, so the filed copy escapes them
    normalize = not string.find(m, '^[^%z\1-\31]*$')
  end
  local ok, msg = pcall(cjson.decode, m)
  if not ok then return nil, 'not a Celery message: not JSON' end
  if shape(msg) ~= 'object' then return nil, 'not a Celery message: not a JSON object' end
  local h = msg['headers']
  if h ~= nil then
    local s = shape(h)
    if not s then return nil, 'not a Celery message: headers is not an object' end
    if s == 'empty' then normalize = true end
  end
  local p = msg['properties']
  if p ~= nil then
    local s = shape(p)
    if not s then return nil, 'not a Celery message: properties is not an object' end
    if s == 'empty' then normalize = true end
    local di = p['delivery_info']
    if di ~= nil then
      local d = shape(di)
      if not d then return nil, 'not a Celery message: properties.delivery_info is not an object' end
      if d == 'empty' then normalize = true end
    end
    local pri = p['priority']
    if type(pri) == 'number' and (pri ~= pri or pri >= 1e300 or pri <= -1e300) then
      return nil, 'not a Celery message: properties.priority is not a finite number'
    end
  end
  if string.find(m, '__type__', 1, true) and has_type_marker(msg, 0) then
    return nil, "not a Celery message: it uses kombu's __type__ markers"
  end
  if normalize then
    -- cjson writes {} for an empty table (kombu needs an object there) and escapes control bytes.
    local eok, text = pcall(cjson.encode, msg)
    if not eok then return nil, 'not a Celery message: cannot be re-encoded' end
    return text, msg
  end
  return m, msg
end

local function dead_letter(m, qname, reason)
  local id = 'intake-' .. redis.call('INCR', KEYS[3] .. ':seq')
  local kept = m
  local cut = 'false'
  if #kept > MAX_LETTER_BYTES then kept = string.sub(kept, 1, MAX_LETTER_BYTES) cut = 'true' end
  -- The entry must be valid JSON whatever the bytes: each byte >= 0x80 is written as a
  -- surrogate escape (Python reads it back byte for byte with 'surrogateescape').
  local raw = (string.gsub(cjson.encode(kept), '[\128-\255]', function(c)
    return string.format('\\udc%02x', string.byte(c)) end))
  redis.call('HSET', KEYS[3], id, '{"id":' .. cjson.encode(id) .. ',"queue":' .. cjson.encode(qname) ..
    ',"reason":' .. cjson.encode(reason) .. ',"failed_at":' .. now .. ',"retries":0,"truncated":' .. cut ..
    ',"message":' .. raw .. '}')
  redis.call('ZADD', KEYS[4], now, id)
  return id
end

-- Returns true when the message was handed out (filed or dead-lettered), false when deferred.
local function take(m, li)
  local qname = QUEUES[li]
  local payload, msg = restorable(m)
  if not payload then
    local id = dead_letter(m, qname, msg)
    -- What the worker needs to recover the id and fail it: the head of the message.
    table.insert(out, id) table.insert(out, string.sub(m, 1, MAX_LETTER_BYTES))
    table.insert(out, li) table.insert(out, msg)
    return true
  end
  local props = msg['properties']
  if DEFER[li] and (type(props) ~= 'table' or props['priority'] == nil) then
    -- No priority set (a stock Celery client): kombu filed it with the most urgent jobs; it
    -- waits with Conveyor's default priority 5 instead, in its order.
    redis.call('LPUSH', LISTS[DEFER[li]], m)
    return false
  end
  local tag = nil
  if type(props) == 'table' then
    local t = props['delivery_tag']
    -- A tag is a key in kombu's hash and a member of its index: only a plain one is kept.
    if type(t) == 'string' and #t <= 128 and string.find(t, '^[%w%-%._:]+$') then tag = t end
  end
  if not tag or redis.call('HEXISTS', KEYS[1], tag) == 1 then
    tag = 'conveyor-' .. redis.call('INCR', KEYS[1] .. ':conveyor-seq')
  end
  redis.call('ZADD', KEYS[2], now, tag)
  redis.call('HSET', KEYS[1], tag, '[' .. payload .. ',"",' .. cjson.encode(qname) .. ']')
  table.insert(out, tag) table.insert(out, m) table.insert(out, li) table.insert(out, '')
  return true
end

local interactive = tonumber(ARGV[3])
local nbulk = tonumber(ARGV[4])
local per_level = tonumber(ARGV[5]) or 1  -- interactive queues: the lists of one priority level
-- How many lists hold messages: one EXISTS over the interactive lists and one over the bulk ones.
-- An idle look ends here (three commands, not one RPOP per list: 7 kinds x 10 priorities, twice);
-- a busy one skips each priority level where no list holds any (one EXISTS over the level) and
-- stops after the last list that does.
local left = redis.call('EXISTS', unpack(LISTS, 1, interactive))
local bulk_left = 0
if nlists > interactive then bulk_left = redis.call('EXISTS', unpack(LISTS, interactive + 1, nlists)) end
if left == 0 and bulk_left == 0 then return out end

local taken = 0
local i = 1
while i <= interactive and left > 0 and taken < n do
  local last = math.min(i + per_level - 1, interactive)
  if per_level == 1 or redis.call('EXISTS', unpack(LISTS, i, last)) > 0 then
    for j = i, last do
      if left <= 0 or taken >= n then break end
      local got = redis.call('RPOP', LISTS[j], n - taken)
      if got then
        left = left - 1
        for _, m in ipairs(got) do
          -- false: deferred onto a later list, which may have been empty
          if take(m, j) then taken = taken + 1 else left = left + 1 end
        end
      end
    end
  end
  i = last + 1
end
-- Bulk messages (many rows each) only when no interactive job waits.
if nbulk > 0 and taken == 0 and bulk_left > 0 and not (n <= 0 and left > 0) then
  for i = interactive + 1, nlists do
    if nbulk <= 0 or bulk_left <= 0 then break end
    local had = false
    while nbulk > 0 do
      local m = redis.call('RPOP', LISTS[i])
      if not m then break end
      had = true
      if take(m, i) then nbulk = nbulk - 1 else bulk_left = bulk_left + 1 end
    end
    if had then bulk_left = bulk_left - 1 end
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
    index = {key: i + 1 for i, (key, _) in enumerate(lists)}
    defer = {
        index[key]: index[priority_list(queue, DEFAULT_CELERY_PRIORITY)]
        for key, queue in lists
        if key == priority_list(queue, 0) and priority_list(queue, DEFAULT_CELERY_PRIORITY) in index
    }
    return (
        POP_SCRIPT.replace("--LISTS--", ", ".join(_lua_string(key) for key, _ in lists))
        .replace("--QUEUES--", ", ".join(_lua_string(queue) for _, queue in lists))
        .replace("--DEFER--", ", ".join(f"[{a}] = {b}" for a, b in sorted(defer.items())))
        .replace("--MAX_BYTES--", str(MAX_MESSAGE_BYTES))
        .replace("--MAX_LETTER_BYTES--", str(dead_letters.MAX_MESSAGE_CHARS))
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
    """The job, validated; its id is the task id (a result is keyed by the task id, so a job that
    names another one is refused rather than answered under an id its schema never checked)."""
    if task_id is not None:
        if "id" in data and data["id"] != task_id:
            named, task = printable(str(data["id"]), 100), printable(task_id, 100)
            raise InvalidJob(f"id: the job's id {named!r} is not its task id {task!r}")
        data = {**data, "id": task_id}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidJob(f"invalid {model.__name__}: {describe_validation_error(exc)}") from None


def item_count(job: JobBase) -> int:
    """A job's batch items: the entries of its kind's ``items`` field, or one."""
    spec = KINDS.get(job.type)
    field = spec.items if spec is not None else None
    return max(1, len(getattr(job, field))) if field else 1


def rough_items(env: Envelope) -> int:
    """Items of a decoded message before it is validated (prefetch counts items, not messages)."""
    spec = by_task(env.task or "")
    if spec is None or spec.items is None:
        return 1
    try:
        data = job_data(env.args, env.kwargs)
    except InvalidJob:
        return 1
    value = data.get(spec.items)
    return max(1, len(value)) if isinstance(value, list) else 1


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
            "id": env.id, "name": env.task, "args": saferepr(env.args, maxlen=1024),
            "kwargs": saferepr(env.kwargs, maxlen=1024), "type": env.task,
            "hostname": None, "time_start": self.received, "acknowledged": False,
            "delivery_info": {"routing_key": env.queue, "priority": env.priority, "redelivered": env.deliveries > 1},
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
        max_deliveries: int = 5,
        job_types: Sequence[str] = INFERENCE_TYPES,
        accept: Callable[[], bool] | None = None,
        idle_poll_s: float = 0.005,
        wakeup: Wakeup | None = None,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 1000,
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
        self.max_deliveries = max(1, max_deliveries)
        self.result_ttl_s = result_ttl_s
        self.retry_backoff_s = retry_backoff_s
        self.idle_poll_s = max(_IDLE_FIRST_S, idle_poll_s)
        self.wakeup = wakeup  # None: poll while idle
        self.revoked = revoked
        self.on_active = on_active
        self.on_outcome = on_outcome
        self.on_retry = on_retry
        self._task_types = {TASKS[t]: t for t in job_types}
        self._accept = accept  # False: take nothing now (a training worker whose Celery side is busy)
        self._lists = served_lists(queues, bulk_queues)
        self._interactive = len(queues) * len(CELERY_PRIORITIES)
        self._per_level = max(1, len(queues))
        self._bulk_queues = frozenset(bulk_queues)
        self._keys = [UNACKED_KEY, UNACKED_INDEX_KEY, DEAD_LETTER_KEY, DEAD_LETTER_ORDER_KEY]
        self._pop = client.register_script(pop_script(self._lists))
        self.writer = ResultWriter(
            writer_client, hostname, result_ttl_s, events, self._written, wait_replicas, wait_timeout_ms
        )
        self._inflight: dict[int, InFlight] = {}  # id(job) -> entry
        self._items = 0  # items of the interactive jobs held, until their results are written
        self._bulk = 0  # bulk messages held: at most BULK_IN_FLIGHT, so one is ready when one ends
        self._items_per_message = 1.0  # recent interactive messages' items: how many to pop
        self._room = threading.Condition()
        self._retries: list[tuple[float, int, InFlight]] = []  # (due, seq, entry), a heap
        self._seq = 0
        self._stop = threading.Event()
        self._draining = threading.Event()  # take no new jobs (recycling, stopping)
        self._thread = threading.Thread(target=self._loop, name="ingest", daemon=True)
        self.beat = time.monotonic()  # when the pull loop last turned: the worker's liveness
        self.progress_at = time.monotonic()  # when a held job last moved (a result written, a batch run)
        self.timed_out = 0  # jobs given up at their time limit (counted for metrics and tests)
        self._limits_checked = time.monotonic()

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> Ingest:
        self.writer.start()
        self._thread.start()
        return self

    def drain(self) -> None:
        """Take no new jobs; those held finish (the worker is about to be recycled)."""
        self._draining.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking jobs, let the held ones finish and be written (up to ``timeout``), then
        put any still unfinished back at the head of the lists they came from, at once."""
        self._draining.set()
        self._stop.set()
        if self.wakeup is not None:
            self.wakeup.stop()
        with self._room:
            self._room.notify_all()
        deadline = time.monotonic() + timeout
        self._thread.join(timeout)
        while (self._inflight or self.writer.pending) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = list(self._inflight.values())
        self._inflight.clear()
        for entry in left:
            self.runtime.cancel(entry.job)
        if left:
            log.warning("putting %d unfinished jobs back on their queues", len(left))
            for entry in reversed(left):  # the oldest ends at the head
                self.writer.put(Outcome(entry.env, "", requeue=True))
        self.writer.stop(timeout=max(2.0, deadline - time.monotonic() + 2.0))
        if self.writer.pending:  # the writer could not finish (Redis away): try once more here
            self._requeue([entry.env for entry in left])

    # -- health -------------------------------------------------------------------------------------
    def health(self, stall_s: float) -> str | None:
        """None while the worker does its work; else what is wrong: a loop that stopped turning,
        a thread that died, or jobs held with no progress (no result, no batch) for ``stall_s``."""
        now = time.monotonic()
        if not self._thread.is_alive() and not self._stop.is_set():
            return "the ingest thread died"
        if now - self.beat > stall_s:
            return f"the ingest loop has not turned for {now - self.beat:.0f}s"
        if not self.writer.alive() and not self._stop.is_set():
            return "the result writer died"
        if now - self.writer.beat > stall_s:
            return f"the result writer has not turned for {now - self.writer.beat:.0f}s"
        if self._inflight and now - max(self.progress_at, self.writer.written_at) > stall_s:
            return f"{len(self._inflight)} jobs held and nothing written or run for {stall_s:.0f}s"
        return None

    def batch_ran(self) -> None:
        """A forward pass finished (the runtime's batch observer): held jobs are moving."""
        self.progress_at = time.monotonic()

    # -- what the lease keeper renews ---------------------------------------------------------------
    def held_tags(self) -> list[str]:
        """Delivery tags of the jobs really running here (jobs past their time limit given up first)."""
        self.check_time_limits()
        return [entry.env.tag for entry in list(self._inflight.values()) if entry.env.tag]

    def check_time_limits(self) -> None:
        """A job past its time limit is given up: its items still waiting in a batcher are
        cancelled and it goes back to its queue at once, where its delivery count fails it for
        good after ``max_deliveries`` (never held or redelivered forever)."""
        now = time.monotonic()
        self._limits_checked = now
        for key, entry in list(self._inflight.items()):
            if now - entry.started > self.time_limit_s and self._inflight.pop(key, None) is not None:
                self._time_out(entry)

    def _time_out(self, entry: InFlight) -> None:
        self.timed_out += 1
        log.error(
            "job %s ran past the %.0fs time limit (delivery %d of %d); cancelled and put back on its queue",
            printable(entry.id or "?"), self.time_limit_s, entry.env.deliveries, self.max_deliveries,
        )  # fmt: skip
        self.runtime.cancel(entry.job)
        env = entry.env
        back = Envelope(marked_redelivered(env.raw), tag=env.tag, id=env.id, task=env.task, queue=env.queue)
        back.list_key = env.list_key
        self.writer.put(Outcome(back, "", requeue=True))
        self._release([entry])
        if self.on_active is not None:
            self.on_active(entry, False)

    @property
    def held(self) -> int:
        return len(self._inflight)

    # -- the pull loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        # Redis has no blocking pop across many lists that leaves the message safe until it is
        # filed as unacked (a worker frozen inside BRPOP would take one message with it), so an
        # idle worker sleeps until a push wakes it (``workers.wakeup``), or, where Redis sends no
        # keyspace notifications, polls: the wait grows from 0.5 ms to CONVEYOR_IDLE_POLL_MS.
        backoff = 0.1
        idle = _IDLE_FIRST_S
        while not self._stop.is_set():
            self.beat = time.monotonic()
            if self.wakeup is not None:
                self.wakeup.clear()  # before the pop: a push after it wakes the wait below
            try:
                self._due_retries()
                if self.beat - self._limits_checked > _LIMITS_EVERY_S:
                    self.check_time_limits()
                room, bulk_room = self._wait_for_room()
                if room <= 0 and bulk_room <= 0:
                    continue
                popped = self._pop_messages(room, bulk_room)
                backoff = 0.1
            except Exception as exc:  # Redis away (or anything else): wait, reconnect, go on
                if not isinstance(exc, redis.RedisError):
                    log.exception("ingest: pop failed")
                log.warning("ingest: %s (%s); retrying in %.1fs", type(exc).__name__, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if not popped:
                if self.wakeup is not None and self.wakeup.armed:
                    self.wakeup.wait(self._sleep_s())
                    continue
                self._stop.wait(idle)
                idle = min(idle * 2, self.idle_poll_s)
                continue
            idle = _IDLE_FIRST_S
            try:
                self._dispatch(popped, room)
            except Exception:  # never let one bulk stop the loop; its jobs stay unacked and come back
                log.exception("ingest: dispatch failed")
            if len(popped) < min(room, _COALESCE_BELOW):
                # Jobs trickling in: let a few gather for 1 ms rather than pay a pop for each one.
                self._stop.wait(_COALESCE_S)

    def _sleep_s(self) -> float:
        """How long an armed idle loop may sleep: until the next due retry or time-limit check."""
        sleep = SAFETY_LOOK_S if not self._inflight else _LIMITS_EVERY_S
        with self._room:
            if self._retries:
                sleep = min(sleep, max(0.0, self._retries[0][0] - time.monotonic()))
        return sleep

    def _wait_for_room(self) -> tuple[int, int]:
        with self._room:
            while not self._stop.is_set():
                full = self._items >= self.prefetch_items and self._bulk >= BULK_IN_FLIGHT
                refused = self._accept is not None and not self._accept()  # e.g. Celery still runs a job
                if not (full or refused or self._draining.is_set()):
                    break
                # Nobody signals when Celery's side becomes idle: look again soon, without spinning.
                self._room.wait(_ACCEPT_POLL_S if refused and not full else _LIMITS_EVERY_S)
                self.beat = time.monotonic()  # waiting for the batches to make room is alive
                if self.beat - self._limits_checked > _LIMITS_EVERY_S:
                    self.check_time_limits()  # a hung batch is exactly when the room stays full
            if self._stop.is_set():
                return 0, 0
            return self.prefetch_items - self._items, BULK_IN_FLIGHT - self._bulk

    def _pop_messages(self, room: int, bulk_room: int) -> list[_Popped]:
        # Ask for as many messages as the room holds at the recent items per message; a pop
        # that brings more items than that is trimmed in ``_dispatch``.
        want = max(1, int(room / self._items_per_message)) if room > 0 else 0
        args: list[str | int | float] = [want, time.time(), self._interactive, max(0, bulk_room), self._per_level]
        raw = self._pop(keys=self._keys, args=args)
        popped = []
        for i in range(0, len(raw), 4):
            index = int(raw[i + 2]) - 1
            key, queue = self._lists[index]
            popped.append(_Popped(_text(raw[i]), _text(raw[i + 1]), key, queue, _text(raw[i + 3])))
        return popped

    def _dispatch(self, popped: list[_Popped], room: int) -> None:
        received = time.time()
        envs: list[Envelope] = []
        if any(p.reason for p in popped):
            dead_letters.trim(self.client)  # the pop script added some: keep the store bounded
        for p in popped:
            if p.reason:
                self._refused_at_intake(p)
                continue
            env = decode(p.message)
            env.tag, env.list_key, env.queue = p.tag, p.list_key, p.queue
            envs.append(env)
        envs = self._trim_to_room(envs, room)
        if not envs:
            return
        finished, cancelled, deliveries = self._lookups(
            [e.id for e in envs if e.ok and e.id], {e.id for e in envs if e.ok and e.id and e.redelivered}
        )
        jobs: list[JobBase] = []
        for env in envs:
            if env.id is not None:
                env.deliveries = deliveries.get(env.id, 1)
            try:
                entry = self._admit(env, received, finished, cancelled)
            except ConveyorError as exc:
                self._finish_early(env, exc)
                continue
            except Exception as exc:  # a bug met by one message fails that message, never the bulk
                log.exception("ingest: admitting job %s failed", printable(env.id or "?"))
                self._finish_early(env, _Refused(f"the worker could not admit this message ({type(exc).__name__})"))
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

    def _trim_to_room(self, envs: list[Envelope], room: int) -> list[Envelope]:
        """Keep the interactive messages whose items fit the room (at least one), and put the rest
        back at the head of their lists: prefetch is counted in items, so a backlog of large jobs
        cannot fill a worker ahead of an urgent one."""
        kept: list[Envelope] = []
        back: list[Envelope] = []
        items = messages = 0
        for env in envs:
            if env.queue in self._bulk_queues or not env.ok:
                kept.append(env)
                continue
            n = rough_items(env)
            items, messages = items + n, messages + 1
            if kept and items - n >= room and (back or items > room):
                back.append(env)
            else:
                kept.append(env)
        if messages:
            self._items_per_message = 0.5 * self._items_per_message + 0.5 * (items / messages)
        if back:
            self._requeue(back)
        return kept

    def _refused_at_intake(self, p: _Popped) -> None:
        """A message the pop script dead-lettered (it could not be filed for kombu's restore): its
        client, where the id can be read, gets a FAILURE naming the reason."""
        job_id = recover_id(p.message)
        log.warning("a message on %s was moved to the dead-letter queue as %s: %s", p.queue, p.tag, printable(p.reason))
        env = Envelope(p.message, id=job_id, queue=p.queue)
        detail = explain_refusal(p.message, p.reason) if job_id else p.reason
        outcome = Outcome(env, "FAILURE" if job_id else "", InvalidJob(f"message refused: {detail}"))
        outcome.dead_letter = None  # the pop script already wrote the dead letter
        if self.on_outcome is not None:
            self.on_outcome(None, Outcome(env, "", dead_letter=p.reason))
        if job_id:
            self.events.failed(job_id, outcome.result, None)
            self.writer.put(outcome)

    def _urgency(self, job: JobBase) -> float:
        """Bulk rows wait behind every interactive item in the batchers, not only in Redis."""
        entry = self._inflight.get(id(job))
        if entry is not None and entry.bulk:
            return -1.0
        return float(job.priority)

    def _lookups(self, ids: list[str], redelivered: set[str]) -> tuple[set[str], set[str], dict[str, int]]:
        """Jobs already finished (a redelivered duplicate), jobs cancelled, and how often each
        redelivered one was taken (this time included): one round trip. A first delivery costs
        no counter; kombu's restore and a time-limit release mark the copies they put back."""
        if not ids:
            return set(), set(), {}
        keys = [wire_bytes(i) for i in ids]
        again = [i for i in ids if i in redelivered]
        pipe = self.client.pipeline(transaction=False)
        pipe.mget([RESULT_KEY_PREFIX.encode() + k for k in keys])
        pipe.mget([CANCEL_KEY_PREFIX.encode() + k for k in keys])
        for i in again:
            key = DELIVERIES_KEY_PREFIX.encode() + wire_bytes(i)
            pipe.incr(key)
            pipe.expire(key, self.result_ttl_s)
        replies = pipe.execute()
        results, cancels, counts = replies[0], replies[1], replies[2::2]
        finished = {i for i, r in zip(ids, results) if r is not None and b'"status":"SUCCESS"' in r.replace(b" ", b"")}
        cancelled = {i for i, c in zip(ids, cancels) if c is not None}
        return finished, cancelled, {i: 1 + int(c) for i, c in zip(again, counts)}

    def _admit(self, env: Envelope, received: float, finished: set[str], cancelled: set[str]) -> InFlight | None:
        if not env.ok:
            raise _Refused(env.error or "malformed message")
        job_type = self._task_types.get(env.task or "")
        if job_type is None:
            task = printable(env.task or "")
            raise _Refused(f"task {task!r} is not served from queue {env.queue!r}")
        assert env.id is not None
        if (unclaimed := claim_refusal(self.client, env.id, job_data(env.args, env.kwargs))) is not None:
            # A tenant's job its producer did not claim: dead-lettered, and no result under an id
            # that is not its sender's (workers/tenancy.py).
            self.writer.put(Outcome(env, "", InvalidJob(unclaimed), dead_letter=unclaimed))
            return None
        if env.id in finished:  # redelivered after its result was written: acknowledge, do not run again
            self.writer.put(Outcome(env, ""))
            return None
        if env.id in cancelled or env.id in self.revoked:
            raise JobCancelled(f"job {env.id} was cancelled before it ran")
        if env.deliveries > self.max_deliveries:
            raise _Refused(
                f"delivered {env.deliveries} times without finishing (a time limit of {self.time_limit_s:.0f}s, "
                f"or workers that died holding it); CONVEYOR_MAX_DELIVERIES is {self.max_deliveries}"
            )
        if env.expires is not None and _passed(env.expires):
            raise JobExpired(f"job {env.id} expired at {env.expires} before it ran")
        data = job_data(env.args, env.kwargs)
        if "priority" not in data and env.priority_set:  # a Celery client's priority, in Conveyor's terms
            data = {**data, "priority": 9 - min(env.priority, 9)}
        job = validate_job(JOB_MODELS[job_type], data, env.id)
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
        self.progress_at = time.monotonic()
        runtime = time.monotonic() - entry.started
        env = entry.env
        if out is HANDED_OFF:  # Celery's worker runs it and writes its result: acknowledge only
            self.writer.put(Outcome(env, "", key=id(job)))
            return
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
            try:
                self.on_outcome(entry, outcome)
            except Exception:  # metrics must never lose a result
                log.exception("outcome observer failed")
        self.writer.put(outcome)

    def _schedule_retry(self, entry: InFlight) -> None:
        # Exponential backoff with full jitter; the job stays held (and leased) meanwhile.
        delay = random.uniform(0, self.retry_backoff_s * 2 ** (entry.attempts - 1))
        log.warning("job %s failed transiently; retry %d in %.2fs", printable(entry.id or "?"), entry.attempts, delay)
        if self.on_retry is not None:
            self.on_retry(entry)
        with self._room:
            self._seq += 1
            heapq.heappush(self._retries, (time.monotonic() + delay, self._seq, entry))
        if self.wakeup is not None:
            self.wakeup.wake()  # a sleeping loop recomputes how long it may sleep

    def _due_retries(self) -> None:
        now = time.monotonic()
        due: list[InFlight] = []
        with self._room:
            while self._retries and self._retries[0][0] <= now:
                due.append(heapq.heappop(self._retries)[2])
        due = [e for e in due if id(e.job) in self._inflight]  # not given up meanwhile
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
        if self.wakeup is not None:
            self.wakeup.wake()  # room again: a loop asleep on empty queues (or on a full room) looks now

    # -- putting messages back ---------------------------------------------------------------------------
    def _requeue(self, envs: list[Envelope]) -> None:
        """Put messages back at the head of the lists they came from (oldest at the head), and
        out of kombu's unacked structures, in one MULTI."""
        pipe = self.client.pipeline(transaction=True)
        for env in reversed(envs):
            if env.list_key is None:
                continue  # never a made-up key: without its list it stays unacked for kombu's restore
            pipe.rpush(env.list_key, wire_bytes(env.raw))
            if env.tag:
                pipe.zrem(UNACKED_INDEX_KEY, env.tag)
                pipe.hdel(UNACKED_KEY, env.tag)
        try:
            pipe.execute()
        except redis.RedisError as exc:  # they stay unacked: the visibility timeout brings them back
            log.warning("could not put %d jobs back on their queues: %s", len(envs), exc)


@dataclass(frozen=True, slots=True)
class _Popped:
    tag: str  # unacked key; for a dead-lettered message, the dead letter's id
    message: str
    list_key: str
    queue: str
    reason: str  # "" when filed; else why it was dead-lettered at intake


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
