"""Loaded models, cached per worker process under a memory bound, least recently used evicted.

Keys are resolved model paths (a version directory), so ``NAME@latest`` picks up a new
version the moment it is published: the new path is a new key, loaded on first use.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def size_of(obj: Any) -> int:
    """Bytes held by a model's parameters and buffers (0 for objects that have none)."""
    total = 0
    for attr in ("parameters", "buffers"):
        tensors = getattr(obj, attr, None)
        if callable(tensors):
            total += sum(t.numel() * t.element_size() for t in tensors())
    nbytes = getattr(obj, "nbytes", None)
    if isinstance(nbytes, int):
        total += nbytes
    return total


_LOADING = threading.RLock()


class ModelCache:
    def __init__(self, max_bytes: int, sizer: Callable[[Any], int] = size_of) -> None:
        self.max_bytes = max_bytes
        self._sizer = sizer
        self._entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, load: Callable[[], T]) -> T:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key][0]
        # Outside the cache's lock (loading is slow), but one load at a time in the process:
        # transformers builds a model on the meta device and patches torch.nn globally while it
        # does, so two kinds' batchers loading at once (a cold worker given jobs of every kind)
        # failed with "Cannot copy out of meta tensor". Re-entrant: a load may load another model.
        with _LOADING:
            value = load()
        size = self._sizer(value)
        with self._lock:
            self._entries[key] = (value, size)
            self._entries.move_to_end(key)
            self._evict(keep=key)
        return value

    def _evict(self, keep: str) -> None:
        while self.total_bytes() > self.max_bytes and len(self._entries) > 1:
            oldest = next(iter(self._entries))
            if oldest == keep:
                break
            self._entries.pop(oldest)
            log.info("model cache: evicted %s", oldest)

    def total_bytes(self) -> int:
        return sum(size for _, size in self._entries.values())

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)
