"""The dead-letter queue: messages a worker gave up on (retries exhausted, or not decodable at
all), each kept with its original raw message and the reason, until requeued or purged.

Redis layout (shared/names.py): ``DEAD_LETTER_KEY`` is a hash id -> entry (JSON), and
``DEAD_LETTER_ORDER_KEY`` a sorted set id -> unix time, for newest-first listing. The store
keeps at most ``MAX_DEAD_LETTERS`` entries (the oldest go first), so a flood of garbage
cannot fill Redis's memory. redis-py only, no Lua: workers add, the CLI lists and requeues.

``message`` is the queue list's entry exactly as it was. Bytes that are not UTF-8 are kept
with ``raw_message_text`` (surrogate escapes) and restored byte for byte on requeue.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Final, cast

import redis
from pydantic import BaseModel, Field, ValidationError

from shared.names import DEAD_LETTER_KEY, DEAD_LETTER_ORDER_KEY, priority_list
from shared.wire_text import printable, wire_bytes

MAX_DEAD_LETTERS: Final = 10_000
# A dead letter keeps at most this much of its message (and says so): 10,000 letters of 64 MiB
# messages would fill any Redis.
MAX_MESSAGE_CHARS: Final = 1024 * 1024
MAX_REASON_CHARS: Final = 2000


class DeadLetterNotFound(LookupError):
    """No dead letter by that id."""


class UnreadableDeadLetter(ValueError):
    """An entry that is not a dead letter's JSON (written by something else): shown, never requeued."""


class DeadLetter(BaseModel):
    id: str = Field(description="The job (task) id, or an id given to a message that had none.")
    queue: str = Field(description="The queue the message was taken from (and goes back to on requeue).")
    task: str | None = Field(default=None, description="The task name, where the message named one.")
    reason: str = Field(description="Why the worker gave up on it.")
    failed_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    retries: int = Field(default=0, ge=0, description="Attempts made before giving up.")
    message: str = Field(description="The raw message, exactly as it was on the queue list.")
    truncated: bool = Field(
        default=False, description=f"Only the first {MAX_MESSAGE_CHARS} bytes of the message are kept: never requeued."
    )

    @classmethod
    def bounded(cls, *, id: str, queue: str, task: str | None, reason: str, retries: int, message: str) -> DeadLetter:
        """A letter for anything a worker gives up on, whatever its strings hold: the id and
        reason made printable (they become a hash field and a log line), the message cut to
        ``MAX_MESSAGE_CHARS``."""
        return cls(
            id=printable(id, 300),
            queue=printable(queue, 300),
            task=None if task is None else printable(task, 300),
            reason=printable(reason, MAX_REASON_CHARS),
            retries=max(0, retries),
            message=message[:MAX_MESSAGE_CHARS],
            truncated=len(message) > MAX_MESSAGE_CHARS,
        )

    def to_json(self) -> str:
        # json.dumps, not model_dump_json: it escapes the lone surrogates of non-UTF-8 messages.
        return json.dumps(self.model_dump(mode="json"))

    @classmethod
    def from_json(cls, text: str | bytes) -> DeadLetter:
        return cls.model_validate(json.loads(text))

    def raw_bytes(self) -> bytes:
        """The message's bytes as they were on the list."""
        return self.message.encode("utf-8", "surrogateescape")

    def priority_step(self) -> int:
        """The Celery priority step kombu filed the message under: properties.priority, clamped
        to 0-9, or 0 where the message says none or cannot be read (kombu's own rule)."""
        try:
            envelope = json.loads(self.message)
            return max(0, min(int(envelope["properties"]["priority"]), 9))
        except (ValueError, TypeError, KeyError, IndexError, RecursionError):
            return 0


def raw_message_text(raw: bytes | str) -> str:
    """A queue list's entry as ``DeadLetter.message``: exact, even where it is not UTF-8."""
    return raw if isinstance(raw, str) else raw.decode("utf-8", "surrogateescape")


def add(pipe_or_client: redis.Redis | redis.client.Pipeline, letter: DeadLetter, cap: int = MAX_DEAD_LETTERS) -> None:
    """Record ``letter``. Inside a pipeline (e.g. beside the ack that removes the message) it
    runs when the pipeline does; call ``trim`` after that. Given a client, it trims at once.
    No Lua: some Redis deployments disable scripting."""
    field = wire_bytes(letter.id)
    pipe_or_client.hset(DEAD_LETTER_KEY, field, letter.to_json())
    pipe_or_client.zadd(DEAD_LETTER_ORDER_KEY, {field: letter.failed_at.timestamp()})
    if not isinstance(pipe_or_client, redis.client.Pipeline):
        trim(pipe_or_client, cap)


def trim(client: redis.Redis, cap: int = MAX_DEAD_LETTERS) -> int:
    """Drop the oldest letters beyond ``cap``; returns how many went. One ZCARD when under it."""
    extra = int(client.zcard(DEAD_LETTER_ORDER_KEY)) - cap
    if extra <= 0:
        return 0
    oldest = client.zrange(DEAD_LETTER_ORDER_KEY, 0, extra - 1)
    if not oldest:
        return 0
    pipe = client.pipeline(transaction=True)
    pipe.hdel(DEAD_LETTER_KEY, *oldest)
    pipe.zrem(DEAD_LETTER_ORDER_KEY, *oldest)
    pipe.execute()
    return len(oldest)


def list_letters(client: redis.Redis, limit: int = 100) -> list[DeadLetter]:
    """The newest ``limit`` dead letters, newest first."""
    if limit <= 0:
        return []
    ids = cast(list[tuple[bytes, float]], client.zrevrange(DEAD_LETTER_ORDER_KEY, 0, limit - 1, withscores=True))
    if not ids:
        return []
    entries = cast(list[bytes | None], client.hmget(DEAD_LETTER_KEY, [i for i, _ in ids]))
    return [_parse(i, raw, score) for (i, score), raw in zip(ids, entries) if raw is not None]


def get(client: redis.Redis, letter_id: str) -> DeadLetter | None:
    raw = client.hget(DEAD_LETTER_KEY, letter_id)
    if raw is None:
        return None
    score = client.zscore(DEAD_LETTER_ORDER_KEY, letter_id)
    return _parse(letter_id.encode(), raw, score or 0.0)


def count(client: redis.Redis) -> int:
    return int(client.hlen(DEAD_LETTER_KEY))


def requeue(client: redis.Redis, letter_id: str) -> str:
    """Push the original message back onto its queue's list for its priority (LPUSH, as
    kombu publishes) and delete the entry, in one MULTI; returns the queue. A concurrent
    change to the store retries, so two requeues of one letter push it once."""
    queue: list[str] = []

    def move(pipe: redis.client.Pipeline) -> None:
        raw = pipe.hget(DEAD_LETTER_KEY, letter_id)
        if raw is None:
            raise DeadLetterNotFound(f"no dead letter {letter_id!r}")
        letter = _parse(letter_id.encode(), raw, 0.0)
        if letter.truncated:
            raise UnreadableDeadLetter(
                f"dead letter {letter_id!r} keeps only the first {MAX_MESSAGE_CHARS} bytes of its message; "
                "it cannot be requeued (`purge` removes it)"
            )
        if not letter.queue:
            raise UnreadableDeadLetter(
                f"dead letter {letter_id!r} is unreadable and names no queue; `purge` removes it"
            )
        pipe.multi()
        pipe.lpush(priority_list(letter.queue, letter.priority_step()), letter.raw_bytes())
        pipe.hdel(DEAD_LETTER_KEY, letter_id)
        pipe.zrem(DEAD_LETTER_ORDER_KEY, letter_id)
        queue[:] = [letter.queue]

    client.transaction(move, DEAD_LETTER_KEY)
    return queue[0]


def requeue_all(client: redis.Redis) -> dict[str, int]:
    """Requeue every dead letter, oldest first (so they keep their order); returns how many
    went back to each queue."""
    moved: dict[str, int] = {}
    for raw_id in cast(list[bytes], client.zrange(DEAD_LETTER_ORDER_KEY, 0, -1)):
        letter_id = raw_id.decode()
        try:
            queue = requeue(client, letter_id)
        except DeadLetterNotFound:
            client.zrem(DEAD_LETTER_ORDER_KEY, letter_id)  # an index entry left without its letter
            continue
        except UnreadableDeadLetter:
            continue
        moved[queue] = moved.get(queue, 0) + 1
    return moved


def purge(client: redis.Redis) -> int:
    """Delete every dead letter; returns how many there were."""
    pipe = client.pipeline(transaction=True)
    pipe.hlen(DEAD_LETTER_KEY)
    pipe.delete(DEAD_LETTER_KEY, DEAD_LETTER_ORDER_KEY)
    n, _ = pipe.execute()
    return int(n)


def _parse(letter_id: bytes | str, raw: bytes | str, score: float) -> DeadLetter:
    """An entry, or, if the entry itself is unreadable, a letter saying so that keeps its text."""
    try:
        return DeadLetter.from_json(raw)
    except (ValueError, ValidationError, RecursionError) as exc:
        text = raw_message_text(raw)
        name = letter_id.decode() if isinstance(letter_id, bytes) else letter_id
        return DeadLetter(
            id=name,
            queue="",
            reason=f"the dead-letter entry is unreadable ({type(exc).__name__}); its text is the message",
            failed_at=datetime.fromtimestamp(score, UTC),
            message=text,
        )
