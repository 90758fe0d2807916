"""Strings from the wire, handled as data whatever they hold.

A message taken from Redis is decoded with ``surrogateescape`` (so bytes that are not UTF-8
survive as lone surrogates ``\\udc80``-``\\udcff``), and JSON's ``"\\ud800"`` escape gives lone
surrogates too. Such a string is not text: ``str.encode("utf-8")`` raises on it, which is how
one job used to stop a worker's result writer. Every place that writes a wire string back
(a Redis key, a log line, a metrics label) goes through these helpers; validation refuses
such strings in jobs (``first_non_text``) before they reach a model.
"""

from __future__ import annotations

from typing import Any


def is_text(value: str) -> bool:
    """True when ``value`` is valid Unicode (encodes as UTF-8)."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def wire_bytes(value: str) -> bytes:
    """The bytes ``value`` stood for on the wire: UTF-8, with surrogate escapes turned back into
    the raw bytes they came from (so a key is the one the sender used), other lone surrogates
    kept as their UTF-8-like form. Never raises."""
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        pass
    try:
        return value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")


def printable(value: str, limit: int = 200) -> str:
    """``value`` made safe for logs, labels and error messages: invalid Unicode backslash-escaped,
    control characters escaped, at most ``limit`` characters (``...`` marks a cut)."""
    if not is_text(value):
        value = wire_bytes(value).decode("utf-8", "backslashreplace")
    if not value.isprintable():
        value = "".join(c if c.isprintable() else repr(c)[1:-1] for c in value[: limit + 1])
    return value if len(value) <= limit else value[:limit] + "..."


def first_non_text(data: Any, path: str = "") -> str | None:
    """The path (``texts.3``, ``kwargs.<key>``) of the first string in a JSON-like structure that
    is not valid Unicode, a key included; None when every string is text. Iterative, so any
    depth is safe; cheap for the usual all-ASCII job."""
    stack: list[tuple[Any, str]] = [(data, path)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if not is_text(value):
                return where or "value"
        elif isinstance(value, dict):
            for key, item in value.items():
                key_path = f"{where}.{printable(str(key), 60)}" if where else printable(str(key), 60)
                if isinstance(key, str) and not is_text(key):
                    return f"{key_path} (a key)"
                stack.append((item, key_path))
        elif isinstance(value, list | tuple):
            stack.extend((item, f"{where}.{i}" if where else str(i)) for i, item in enumerate(value))
    return None
