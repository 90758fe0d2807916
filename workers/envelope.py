"""Celery messages as they lie in Redis, decoded without Celery's per-task machinery.

kombu's Redis transport stores each message as one JSON object: ``body`` (base64 of the
serialized ``[args, kwargs, embed]`` for Celery's protocol 2, or of ``{"task", "id", "args",
"kwargs", ...}`` for protocol 1), ``content-type``, ``headers`` (protocol 2: ``task``, ``id``,
``expires``, ``retries``...) and ``properties`` (``delivery_tag``, ``delivery_info``,
``priority``...). ``decode`` never raises: whatever arrives, it returns an ``Envelope``
whose ``error`` says what is wrong, with the task id where one could be read, so the job
fails alone and visibly instead of stopping the ingest.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from typing import Any

from shared.wire_text import find_invalid_text, is_text

JSON_CONTENT_TYPE = "application/json"
# A message larger than this is refused before decoding (the pop script dead-letters it
# without parsing it): inline audio of 16 MiB, base64 twice, is about 29 MiB.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# `"id": "..."` in a message that is not JSON: the id of a job whose client is waiting.
_ID_IN_TEXT = re.compile(r'"id"\s*:\s*"([A-Za-z0-9._:@+=-]{1,200})"')


@dataclass(slots=True)
class Envelope:
    raw: str  # the message exactly as it was on the list: what a dead letter keeps
    tag: str | None = None  # the key of its unacked entry (given by the pop script)
    list_key: str | None = None  # the Redis list it was taken from: where it goes back to
    id: str | None = None
    task: str | None = None
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    queue: str | None = None  # the routing key it was sent with
    priority: int = 0  # Celery's (0 is served first)
    priority_set: bool = False  # the message named one (else Conveyor's default applies)
    expires: str | None = None
    retries: int = 0
    deliveries: int = 1  # times the ingest has taken it, kombu's redeliveries included
    redelivered: bool = False  # kombu's restore (or a time-limit release) marked it: counted by id
    error: str | None = None  # set when the message cannot be run at all; says why

    @property
    def ok(self) -> bool:
        return self.error is None


def decode(raw: str) -> Envelope:
    env = Envelope(raw)
    if len(raw) > MAX_MESSAGE_BYTES:
        env.error = f"message of {len(raw)} bytes is larger than the {MAX_MESSAGE_BYTES}-byte limit"
        return env
    try:
        message = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        env.error = f"not a Celery message: not JSON ({type(exc).__name__})"
        return env
    if not isinstance(message, dict):
        env.error = f"not a Celery message: a JSON {type(message).__name__}, not an object"
        return env
    headers = message.get("headers")
    properties = message.get("properties")
    headers = headers if isinstance(headers, dict) else {}
    properties = properties if isinstance(properties, dict) else {}
    tag = properties.get("delivery_tag")
    env.tag = tag if isinstance(tag, str) and tag else None
    info = properties.get("delivery_info")
    env.redelivered = headers.get("redelivered") is True or (isinstance(info, dict) and info.get("redelivered") is True)
    if isinstance(info, dict) and isinstance(info.get("routing_key"), str):
        env.queue = info["routing_key"]
    priority = properties.get("priority")
    if isinstance(priority, int) and not isinstance(priority, bool) and 0 <= priority <= 255:
        env.priority, env.priority_set = priority, True
    # Protocol 2 names the task and id in the headers: readable even when the body is not.
    env.id = _str(headers.get("id"))
    env.task = _str(headers.get("task"))
    for name, value in (("headers.id", env.id), ("headers.task", env.task)):
        if value is not None and not is_text(value):
            env.error = f"{name} is not valid UTF-8 text"
            return env
    content_type = message.get("content-type")
    if content_type != JSON_CONTENT_TYPE:
        env.error = f"content type {content_type!r} is refused: Conveyor accepts {JSON_CONTENT_TYPE} only"
        return env
    decoded = _body(message, properties)
    if isinstance(decoded, _Bad):
        env.error = decoded.reason
        return env
    body, clean = decoded
    if env.task is not None:  # protocol 2: [args, kwargs, embed]
        if not (isinstance(body, list) and len(body) >= 2 and isinstance(body[0], list) and isinstance(body[1], dict)):
            env.error = "message body is not Celery's [args, kwargs, embed]"
            return env
        env.args, env.kwargs = body[0], body[1]
        env.expires = _str(headers.get("expires"))
        retries = headers.get("retries")
        env.retries = retries if isinstance(retries, int) and retries >= 0 else 0
    elif isinstance(body, dict) and isinstance(body.get("task"), str):  # protocol 1
        env.task, env.id = body["task"], _str(body.get("id"))
        args, kwargs = body.get("args") or [], body.get("kwargs") or {}
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            env.error = "protocol 1 message with args that are not a list or kwargs that are not an object"
            return env
        env.args, env.kwargs = args, kwargs
        env.expires = _str(body.get("expires"))
    else:
        env.error = "not a Celery message: no task name in its headers or body"
        return env
    if env.id is None:
        env.error = "Celery message without a task id"
        return env
    for name, value in (("id", env.id), ("task", env.task), ("expires", env.expires)):
        if value is not None and not is_text(value):
            env.error = f"{name} is not valid UTF-8 text"
            return env
    found = None if clean else find_invalid_text([env.args, env.kwargs])
    if found is not None:
        path, problem = found
        where = ".".join(str(p) for p in (("args", "kwargs")[int(path[0])], *path[1:])) if path else "body"
        env.error = f"{where}: {problem}"
    return env


def marked_redelivered(raw: str) -> str:
    """The message with ``headers.redelivered`` set, as kombu's restore marks what it puts back:
    a job released at its time limit is then counted as delivered again."""
    try:
        message = json.loads(raw)
    except (ValueError, RecursionError):
        return raw
    if not isinstance(message, dict):
        return raw
    headers = message.get("headers")
    message["headers"] = {**(headers if isinstance(headers, dict) else {}), "redelivered": True}
    return json.dumps(message)


def explain_refusal(raw: str, reason: str) -> str:
    """What the pop script's short ``reason`` means for this message, naming the field where
    Python can read it (cjson refuses a lone-surrogate escape anywhere, ``argsrepr`` included)."""
    if len(raw) > MAX_MESSAGE_BYTES:
        return reason
    env = decode(raw)
    if env.error is not None and "Unicode" in env.error:
        return env.error
    try:
        message = json.loads(raw)
    except (ValueError, RecursionError):
        return reason
    found = find_invalid_text(message)
    return f"{'.'.join(str(p) for p in found[0])}: {found[1]}" if found else reason


def recover_id(raw: str) -> str | None:
    """The task id of a message that could not be decoded, where one can still be read, so its
    client gets a FAILURE instead of waiting on PENDING forever."""
    env = decode(raw) if len(raw) <= MAX_MESSAGE_BYTES else Envelope(raw)
    if env.id is not None:
        return env.id
    found = _ID_IN_TEXT.search(raw, 0, 1 << 20)
    return found.group(1) if found else None


# JSON's escape for a UTF-16 surrogate: the only way valid UTF-8 text parses to a lone one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


@dataclass(frozen=True, slots=True)
class _Bad:
    reason: str


def _body(message: dict[str, Any], properties: dict[str, Any]) -> tuple[Any, bool] | _Bad:
    """The parsed body, and whether it is certainly free of strings that are not text (valid
    UTF-8 with no surrogate escape: the usual job is settled by one regex search, not a walk)."""
    body = message.get("body")
    if not isinstance(body, str):
        return _Bad("message body is missing or not a string")
    if properties.get("body_encoding") == "base64":
        try:
            body = base64.b64decode(body, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            return _Bad("message body is not valid base64 of UTF-8 text")
        clean = True
    else:
        clean = is_text(body)
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError) as exc:
        return _Bad(f"message body is not JSON ({type(exc).__name__})")
    return parsed, clean and _SURROGATE_ESCAPE.search(body) is None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
