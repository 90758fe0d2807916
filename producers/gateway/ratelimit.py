"""Each API key's request rate: a token bucket per key, in this gateway's memory (several gateways
each allow the rate: run one, or divide the rate). Tenants' job quotas are another matter: the
SDK checks them in Redis at submit (``QuotaExceeded``), for every producer alike."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    def __init__(self, max_keys: int = 100_000) -> None:
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()
        self._max_keys = max_keys

    def take(self, key: str, rate_per_s: float, burst: int) -> float:
        """Take one token from ``key``'s bucket: 0.0 when allowed, else the seconds until one is there."""
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                if len(self._buckets) >= self._max_keys:
                    self._buckets.clear()  # keys are few; a flood of them only resets everyone to full
                bucket = self._buckets[key] = _Bucket(float(burst), now)
            bucket.tokens = min(float(burst), bucket.tokens + (now - bucket.at) * rate_per_s)
            bucket.at = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / rate_per_s
