"""Webhooks: once a job is done, its view (the body of ``GET /v1/jobs/ID``) is POSTed to the
``callback_url`` its submit named, signed and retried, only ever to an allow-listed host.

- **Allow-list**: ``CONVEYOR_GATEWAY_WEBHOOK_HOSTS`` (``host`` or ``host:port``). A callback to any
  other host is refused at submit (422) and checked again before each attempt; redirects are never
  followed (a 3xx is a failed attempt), so a receiver cannot send the gateway elsewhere.
- **Signature** (Stripe's scheme): ``Conveyor-Signature: t=UNIX,v1=HEX``, HEX the HMAC-SHA256 of
  ``"UNIX." + body`` under ``CONVEYOR_GATEWAY_WEBHOOK_SECRET``; ``verify`` checks one.
- **Retries**: a non-2xx answer, a redirect, a timeout or no connection is tried again after
  ``backoff * 2^(attempt-1)`` seconds (with jitter), ``CONVEYOR_GATEWAY_WEBHOOK_ATTEMPTS`` times in all.
- **Durable**: pending callbacks live in Redis (``conveyor:gateway:webhooks``: job id -> record), so a
  restarted gateway delivers them; a per-job lock (SET NX) keeps two gateways from both delivering.
  A receiver should still treat deliveries as at-least-once (dedupe on ``Conveyor-Job-Id``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import secrets
import time
from collections.abc import Callable
from typing import Final
from urllib.parse import urlsplit

import httpx
import redis
from pydantic import BaseModel, ValidationError

from producers.gateway.views import JobView
from producers.local_redis import private_dir, write_private
from shared.settings import Settings

log = logging.getLogger("conveyor.gateway.webhooks")

WEBHOOKS_KEY: Final = "conveyor:gateway:webhooks"
LOCK_PREFIX: Final = "conveyor:gateway:webhook-lock:"
SECRET_FILE: Final = "gateway-webhook.secret"
SIGNATURE_HEADER: Final = "Conveyor-Signature"
MAX_URL_CHARS: Final = 2048
POLL_S: Final = 0.2  # how often pending callbacks are looked at
MAX_CHECK_INTERVAL_S: Final = 5.0  # an old job's state is read at least this often
MAX_IN_FLIGHT: Final = 32  # deliveries at once


def webhook_secret(settings: Settings) -> str:
    if settings.gateway_webhook_secret:
        return settings.gateway_webhook_secret
    path = settings.home / SECRET_FILE
    if not path.exists():
        private_dir(settings.home)
        write_private(path, secrets.token_urlsafe(32))
    return path.read_text().strip()


def check_callback_url(url: str, hosts: list[str]) -> str:
    """``url`` if a webhook may go there, else ValueError saying why."""
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"callback_url is longer than {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"callback_url is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("callback_url must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("callback_url must not carry a login (user:password@)")
    if not hosts:
        raise ValueError("webhooks are off: CONVEYOR_GATEWAY_WEBHOOK_HOSTS names no host")
    host = parts.hostname.lower()
    if host not in hosts and f"{host}:{port or (443 if parts.scheme == 'https' else 80)}" not in hosts:
        raise ValueError(f"callback_url host {host!r} is not allowed (CONVEYOR_GATEWAY_WEBHOOK_HOSTS)")
    return url


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str, body: bytes, tolerance_s: float = 300.0) -> bool:
    """For receivers: whether ``header`` signs ``body`` under ``secret`` and is recent."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), f"t={timestamp},v1={fields.get('v1', '')}")


class Pending(BaseModel):
    """A callback waiting for its job."""

    url: str
    tenant: str
    created: float  # unix time of the submit
    attempts: int = 0
    next_at: float = 0.0  # unix time before which no attempt is made


class WebhookStore:
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.count = 0  # pending callbacks at the dispatcher's last look, plus those added since

    def full(self) -> bool:
        """Whether CONVEYOR_GATEWAY_MAX_WEBHOOKS are pending (as of the last pass, a fraction of a
        second ago: no Redis call per submit)."""
        return self.count >= self.settings.gateway_max_webhooks

    def add(self, job_id: str, url: str, tenant: str) -> None:
        self.redis.hset(WEBHOOKS_KEY, job_id, Pending(url=url, tenant=tenant, created=time.time()).model_dump_json())
        self.count += 1

    def pending(self) -> dict[str, Pending]:
        found = {}
        for job_id, raw in self.redis.hgetall(WEBHOOKS_KEY).items():
            try:
                found[job_id.decode() if isinstance(job_id, bytes) else job_id] = Pending.model_validate_json(raw)
            except (ValidationError, UnicodeDecodeError):
                self.redis.hdel(WEBHOOKS_KEY, job_id)  # unreadable: nothing could ever deliver it
        self.count = len(found)
        return found

    def update(self, job_id: str, entry: Pending) -> None:
        self.redis.hset(WEBHOOKS_KEY, job_id, entry.model_dump_json())

    def remove(self, job_id: str) -> None:
        self.redis.hdel(WEBHOOKS_KEY, job_id)


class WebhookDispatcher:
    """The gateway's background loop: reads pending callbacks' jobs and delivers the done ones."""

    def __init__(self, store: WebhookStore, settings: Settings, view: Callable[[str, str], JobView]) -> None:
        self.store = store
        self.settings = settings
        self.view = view  # (tenant, job id) -> the job's view, blocking
        self.secret = webhook_secret(settings)
        self._next_check: dict[str, float] = {}
        self._delivering: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)

    async def run(self) -> None:
        timeout = httpx.Timeout(self.settings.gateway_webhook_timeout_s)
        async with httpx.AsyncClient(follow_redirects=False, timeout=timeout, trust_env=False) as http:
            failing = False
            while True:
                try:
                    await self._pass(http)
                    failing = False
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # Redis away, say: the next pass tries again
                    if not failing:  # once per outage, not five times a second
                        log.warning("webhooks: %s: %s; trying again", type(exc).__name__, exc)
                    failing = True
                await asyncio.sleep(POLL_S)

    async def _pass(self, http: httpx.AsyncClient) -> None:
        entries = await asyncio.to_thread(self.store.pending)
        now, mono = time.time(), time.monotonic()
        for gone in set(self._next_check) - set(entries):
            del self._next_check[gone]
        due = [
            (job_id, entry) for job_id, entry in entries.items()
            if job_id not in self._delivering and entry.next_at <= now and self._next_check.get(job_id, 0.0) <= mono
        ]  # fmt: skip
        if not due:
            return
        views = await asyncio.to_thread(lambda: [self.view(entry.tenant, job_id) for job_id, entry in due])
        for (job_id, entry), view in zip(due, views):
            age = now - entry.created
            if not view.done:
                if age > self.settings.result_ttl_s:  # its result can no longer come
                    log.warning("webhook for %s given up: the job did not finish in %.0f s", job_id, age)
                    await asyncio.to_thread(self.store.remove, job_id)
                    continue
                # Young jobs are looked at often, old ones (training) every few seconds.
                self._next_check[job_id] = mono + min(MAX_CHECK_INTERVAL_S, max(POLL_S, age / 10))
                continue
            self._delivering.add(job_id)
            task = asyncio.create_task(self._deliver(http, job_id, entry, view))
            self._tasks.add(task)  # held until done: the loop keeps only weak references
            task.add_done_callback(self._tasks.discard)

    async def _deliver(self, http: httpx.AsyncClient, job_id: str, entry: Pending, view: JobView) -> None:
        lock = LOCK_PREFIX + job_id
        hold_ms = int((self.settings.gateway_webhook_timeout_s + 10) * 1000)
        try:
            async with self._slots:
                if not await asyncio.to_thread(self.store.redis.set, lock, "1", nx=True, px=hold_ms):
                    return  # another gateway is delivering it
                try:
                    outcome = await self._attempt(http, job_id, entry, view)
                finally:
                    await asyncio.to_thread(self.store.redis.delete, lock)
                await asyncio.to_thread(self._record, job_id, entry, outcome)
        except Exception:
            log.exception("webhook for %s: delivery failed", job_id)
        finally:
            self._delivering.discard(job_id)

    async def _attempt(self, http: httpx.AsyncClient, job_id: str, entry: Pending, view: JobView) -> str | None:
        """None when delivered, else why not."""
        try:
            check_callback_url(entry.url, self.settings.gateway_webhook_hosts)
        except ValueError as exc:
            return f"refused: {exc}"
        body = view.model_dump_json().encode()
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self.secret, int(time.time()), body),
            "Conveyor-Job-Id": job_id,
            "Conveyor-Attempt": str(entry.attempts + 1),
            "User-Agent": "conveyor-gateway",
        }
        try:
            response = await http.post(entry.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}" + (" (redirects are not followed)" if response.is_redirect else "")

    def _record(self, job_id: str, entry: Pending, outcome: str | None) -> None:
        if outcome is None:
            self.store.remove(job_id)
            log.info("webhook for %s delivered to %s", job_id, entry.url)
            return
        entry.attempts += 1
        if outcome.startswith("refused") or entry.attempts >= self.settings.gateway_webhook_attempts:
            self.store.remove(job_id)
            log.warning("webhook for %s given up after %d attempt(s): %s", job_id, entry.attempts, outcome)
            return
        delay = self.settings.gateway_webhook_backoff_s * 2 ** (entry.attempts - 1) * random.uniform(0.5, 1.0)
        entry.next_at = time.time() + delay
        self.store.update(job_id, entry)
        log.info("webhook for %s: attempt %d failed (%s); next in %.1f s", job_id, entry.attempts, outcome, delay)
