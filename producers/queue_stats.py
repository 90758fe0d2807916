"""What waits in Conveyor's queues, read from Redis directly: length per queue and priority,
age of the oldest waiting job, dead letters. Used by the exporter and by `conveyor status`.

kombu's Redis transport keeps one list per priority step: ``queue`` for Celery priority 0,
``queue + "\\x06\\x16" + str(p)`` for p in 1..9 (Conveyor's priority is 9 - Celery's, so the
bare list holds Conveyor's most urgent jobs). Messages are LPUSHed and taken from the right,
so each list's oldest message is at index -1. One Lua script reads every list's length and the
first bytes of its oldest message in a single round trip (a transcribe job can carry megabytes
of audio; only its head is needed: the body is written first, and the job's envelope, with
``submitted_at``, is at the start of the body).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from shared.celery_config import celery_priority
from shared.names import ALL_QUEUES, DEAD_LETTER_KEY, priority_list

PRIORITIES = tuple(range(10))  # Conveyor priorities, 9 most urgent
HEAD_BYTES = 8192  # how much of each oldest message is read


_READ_LISTS = """
local out = {}
for i, key in ipairs(KEYS) do
  local n = redis.call('LLEN', key)
  out[2 * i - 1] = n
  if n > 0 then
    out[2 * i] = string.sub(redis.call('LINDEX', key, -1), 1, tonumber(ARGV[1]))
  else
    out[2 * i] = ''
  end
end
return out
"""

_BODY = re.compile(rb'"body":\s*"([A-Za-z0-9+/=]*)')
_SUBMITTED_AT = re.compile(rb'"submitted_at":\s*"([^"]+)"')


@dataclass(frozen=True)
class QueueStats:
    queue: str
    by_priority: dict[int, int]  # Conveyor priority (9 most urgent) -> jobs waiting
    oldest_age_s: float | None  # 0 when empty; None when no waiting message could be dated

    @property
    def length(self) -> int:
        return sum(self.by_priority.values())


class FirstSeen:
    """Fallback age for messages whose submission time cannot be read: the time this process
    first saw the same message at the head of its list (a lower bound of its real age)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str], float] = {}

    def since(self, key: str, head: bytes, now: float) -> float:
        digest = hashlib.blake2b(head, digest_size=16).hexdigest()
        return self._seen.setdefault((key, digest), now)

    def keep_only(self, heads: Iterable[tuple[str, bytes]]) -> None:
        live = {(key, hashlib.blake2b(head, digest_size=16).hexdigest()) for key, head in heads}
        self._seen = {k: v for k, v in self._seen.items() if k in live}


def read_queues(
    client: redis.Redis,
    queues: Sequence[str] = ALL_QUEUES,
    now: float | None = None,
    first_seen: FirstSeen | None = None,
) -> list[QueueStats]:
    """Length per priority and age of the oldest waiting job of each queue, in one round trip."""
    keys = [priority_list(q, celery_priority(p)) for q in queues for p in PRIORITIES]
    try:
        reply = client.eval(_READ_LISTS, len(keys), *keys, HEAD_BYTES)
    except redis.ResponseError:  # a Redis without Lua scripting: whole messages, in one pipeline
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.llen(key)
            pipe.lindex(key, -1)
        reply = pipe.execute()
    now = time.time() if now is None else now
    heads: list[tuple[str, bytes]] = []
    stats = []
    for qi, queue in enumerate(queues):
        by_priority: dict[int, int] = {}
        ages: list[float] = []
        undated = False
        for pi, priority in enumerate(PRIORITIES):
            i = 2 * (qi * len(PRIORITIES) + pi)
            length, head = int(reply[i]), reply[i + 1] or b""
            by_priority[priority] = length
            if length == 0:
                continue
            submitted = submitted_at(head)
            if submitted is None and first_seen is not None:
                key = keys[qi * len(PRIORITIES) + pi]
                heads.append((key, head))
                submitted = first_seen.since(key, head, now)
            if submitted is None:
                undated = True
            else:
                ages.append(max(0.0, now - submitted))
        oldest = max(ages) if ages else (None if undated else 0.0)
        stats.append(QueueStats(queue, by_priority, oldest))
    if first_seen is not None:
        first_seen.keep_only(heads)
    return stats


def dead_letter_count(client: redis.Redis) -> int:
    return int(client.hlen(DEAD_LETTER_KEY))


def submitted_at(raw: bytes) -> float | None:
    """Unix time a queued message was submitted, from the head of its kombu envelope; None if
    it says nothing readable (a foreign or damaged message is never an error here)."""
    try:
        message = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        message = None  # cut at HEAD_BYTES, or not JSON
    if isinstance(message, dict):
        found = _from_message(message)
        if found is not None:
            return found
    # The head of a long message: decode what there is of the base64 body and look for the field.
    match = _BODY.search(raw)
    text = raw
    if match:
        b64 = match.group(1).rstrip(b"=")
        try:
            text = base64.b64decode(b64[: len(b64) // 4 * 4])
        except (binascii.Error, ValueError):
            text = raw
    found_text = _SUBMITTED_AT.search(text)
    return _parse_time(found_text.group(1).decode("utf-8", "replace")) if found_text else None


def _from_message(message: dict[str, Any]) -> float | None:
    headers = message.get("headers")
    if isinstance(headers, dict) and "submitted_at" in headers:
        return _parse_time(headers["submitted_at"])
    body = message.get("body")
    if not isinstance(body, str):
        return None
    properties = message.get("properties")
    try:
        if isinstance(properties, dict) and properties.get("body_encoding") == "base64":
            body = base64.b64decode(body).decode()
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, binascii.Error):
        return None
    # Celery protocol 2: [args, kwargs, embed]; the job is args[0] or kwargs["job"] or the kwargs.
    if isinstance(payload, list) and len(payload) >= 2:
        args, kwargs = payload[0], payload[1]
        for candidate in (args[0] if isinstance(args, list) and args else None,
                          kwargs.get("job") if isinstance(kwargs, dict) else None, kwargs):  # fmt: skip
            if isinstance(candidate, dict) and "submitted_at" in candidate:
                return _parse_time(candidate["submitted_at"])
    return None


def _parse_time(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    return None
