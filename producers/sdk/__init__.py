"""The producer SDK beyond one job at a time: waiting on many handles (``waiting``), an asyncio
client whose waits are the result backend's pub/sub (``async_client``), and what a result-backend
record means (``outcomes``). ``producers.client.Client`` stays the entry point of the sync SDK;
``AsyncClient`` is importable from here or from ``producers.client``."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:  # lazy: producers.client imports this package's modules
    if name in ("AsyncClient", "AsyncJobHandle"):
        from producers.sdk import async_client

        return getattr(async_client, name)
    raise AttributeError(name)
