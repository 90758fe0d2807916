"""API keys of the HTTP gateway, kept in Redis. A key is shown once, when it is made; Redis holds
only its sha256 (a 32-byte random token has nothing to guess, so a plain hash is enough, and a
lookup by hash compares nothing byte by byte in Python), with the key's name, tenant and the job
types it may submit.

- ``conveyor:gateway:keys`` (hash): sha256 hex -> the key's record (JSON, ``ApiKey``).
- ``conveyor:gateway:key-names`` (hash): name -> sha256 hex, so keys are listed and revoked by name.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from datetime import UTC, datetime
from typing import Final

import redis
from pydantic import BaseModel, Field, ValidationError

from shared.kinds import JOB_TYPES
from shared.tenants import check_tenant

KEYS_KEY: Final = "conveyor:gateway:keys"
NAMES_KEY: Final = "conveyor:gateway:key-names"
KEY_PREFIX: Final = "cvk_"  # makes a leaked key easy to recognise (secret scanners, logs)
NAME_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_KEY_CHARS: Final = 128
# A revoked key keeps working in a gateway for at most this long (its cache of looked-up keys).
CACHE_S: Final = 1.0


class ApiKey(BaseModel):
    """One API key's record (never the key itself)."""

    name: str
    tenant: str
    types: list[str] | None = Field(default=None, description="Job types it may submit; None: every type.")
    rate_per_s: float | None = Field(
        default=None, description="Its own request rate; None: CONVEYOR_GATEWAY_RATE_PER_S."
    )
    burst: int | None = Field(default=None, description="Its own burst; None: CONVEYOR_GATEWAY_RATE_BURST.")
    created_at: datetime

    def may_submit(self, job_type: str) -> bool:
        return self.types is None or job_type in self.types


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class KeyStore:
    """Add, revoke, list and look up keys (one Redis client, thread-safe)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}

    def add(
        self,
        name: str,
        tenant: str,
        types: list[str] | None = None,
        rate_per_s: float | None = None,
        burst: int | None = None,
    ) -> str:
        """Make a key and return it (the only time it exists outside the caller's hands)."""
        if not NAME_PATTERN.fullmatch(name):
            raise ValueError(f"a key name is 1-64 of letters, digits, '.', '_' and '-', not {name!r}")
        check_tenant(tenant)
        unknown = sorted(set(types or ()) - set(JOB_TYPES))
        if unknown:
            raise ValueError(f"unknown job type(s) {', '.join(unknown)}; one of {', '.join(JOB_TYPES)}")
        if (rate_per_s is not None and rate_per_s <= 0) or (burst is not None and burst < 1):
            raise ValueError("--rate-per-s must be above 0 and --burst at least 1")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        digest = key_hash(key)
        record = ApiKey(
            name=name, tenant=tenant, types=sorted(set(types)) if types else None, rate_per_s=rate_per_s,
            burst=burst, created_at=datetime.now(UTC),
        )  # fmt: skip
        # The name is claimed first (HSETNX), so two `keys add` of one name cannot both win.
        if not self.redis.hsetnx(NAMES_KEY, name, digest):
            raise ValueError(f"a key named {name!r} exists; `conveyor keys revoke {name}` first")
        self.redis.hset(KEYS_KEY, digest, record.model_dump_json())
        return key

    def revoke(self, name: str) -> bool:
        digest = self.redis.hget(NAMES_KEY, name)
        if digest is None:
            return False
        pipe = self.redis.pipeline()
        pipe.hdel(KEYS_KEY, digest)
        pipe.hdel(NAMES_KEY, name)
        pipe.execute()
        return True

    def list(self) -> list[ApiKey]:
        records = []
        for raw in self.redis.hvals(KEYS_KEY):
            try:
                records.append(ApiKey.model_validate_json(raw))
            except ValidationError:
                continue  # a record this release cannot read is no key
        return sorted(records, key=lambda r: r.name)

    def cached(self, key: str) -> tuple[bool, ApiKey | None]:
        """(True, record or None) when the answer is known without Redis (a malformed key, or one
        looked up less than CACHE_S ago); (False, None) when ``lookup`` must ask."""
        if not key.startswith(KEY_PREFIX) or len(key) > MAX_KEY_CHARS:
            return True, None
        found = self._cache.get(key_hash(key))
        if found is not None and time.monotonic() - found[0] < CACHE_S:
            return True, found[1]
        return False, None

    def lookup(self, key: str) -> ApiKey | None:
        """The key's record, or None for a key that is not (or no longer) valid."""
        if not key.startswith(KEY_PREFIX) or len(key) > MAX_KEY_CHARS:
            return None
        digest = key_hash(key)
        now = time.monotonic()
        raw = self.redis.hget(KEYS_KEY, digest)
        record: ApiKey | None = None
        if raw is not None:
            try:
                record = ApiKey.model_validate_json(raw)
            except ValidationError:
                record = None
        if len(self._cache) > 10_000:  # wrong keys must not grow it without bound
            self._cache.clear()
        self._cache[digest] = (now, record)
        return record
