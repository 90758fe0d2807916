"""Strings from the wire, handled as data whatever they hold.

A message taken from Redis is decoded with ``surrogateescape`` (so bytes that are not UTF-8
survive as lone surrogates ``\\udc80``-``\\udcff``), and JSON's ``"\\ud800"`` escape gives lone
surrogates too. Such a string is not text: ``str.encode("utf-8")`` raises on it, which is how
one job used to stop a worker's result writer. Every place that writes a wire string back
(a Redis key, a log line, a metrics label) goes through these helpers; validation refuses
such strings in jobs (``first_non_text``) before they reach a model.
"""

from __future__ import annotations

from typing import Any, Final


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


MAX_NESTING: Final = 32  # lists and objects inside a job; a real job nests two or three deep


def _surrogate_error(value: str) -> str | None:
    """None if ``value`` is valid Unicode, else what is wrong with it (never its text)."""
    if value.isascii():  # O(1) in CPython: the string knows
        return None
    try:
        value.encode("utf-16-le")  # refuses exactly what UTF-8 refuses (lone surrogates), ~3x faster
    except UnicodeEncodeError as exc:
        code = ord(value[exc.start])
        # U+DC80-U+DCFF is how a byte that is not UTF-8 arrives (decoded with surrogateescape).
        byte = f": the byte 0x{code - 0xDC00:02X}, not UTF-8" if 0xDC80 <= code <= 0xDCFF else ""
        return f"not valid Unicode: a lone surrogate (U+{code:04X}{byte}) at character {exc.start}"
    return None


def _path_part(key: Any) -> str | int:
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    text = key if isinstance(key, str) else repr(key)
    if len(text) <= 64 and text.isascii() and text.isprintable():
        return text
    return ascii(text[:64])


def find_invalid_text(data: Any) -> tuple[tuple[str | int, ...], str] | None:
    """(path, problem) of the first string in ``data`` (dict keys and values, lists, tuples,
    nested) that is not valid Unicode, or of a nesting deeper than ``MAX_NESTING``; None if
    all is well. Iterative, so no input can exhaust the stack; the depth bound ends cycles."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            problem = _surrogate_error(value)
            if problem is not None:
                return path, problem
        elif isinstance(value, dict):
            if len(path) >= MAX_NESTING:
                return path, f"nested deeper than {MAX_NESTING} levels"
            for key, item in value.items():
                if isinstance(key, str):
                    problem = _surrogate_error(key)
                    if problem is not None:
                        return (*path, _path_part(key)), f"the key is {problem}"
                if isinstance(item, str):
                    if not item.isascii():
                        problem = _surrogate_error(item)
                        if problem is not None:
                            return (*path, _path_part(key)), problem
                elif isinstance(item, (dict, list, tuple)):
                    stack.append((item, (*path, _path_part(key))))
        elif isinstance(value, (list, tuple)):
            if len(path) >= MAX_NESTING:
                return path, f"nested deeper than {MAX_NESTING} levels"
            for i, item in enumerate(value):
                if isinstance(item, str):
                    if not item.isascii():  # the common case costs one flag test per string
                        problem = _surrogate_error(item)
                        if problem is not None:
                            return (*path, i), problem
                elif isinstance(item, (dict, list, tuple)):
                    stack.append((item, (*path, i)))
    return None


def first_non_text(data: Any) -> str | None:
    """The dotted path (``texts.3``) of the first string in ``data`` that is not valid Unicode
    (or of a nesting deeper than ``MAX_NESTING``); None when all is well."""
    found = find_invalid_text(data)
    if found is None:
        return None
    return ".".join(str(p) for p in found[0]) or "value"
