"""Wake an idle ingest when a job arrives, so an idle worker costs Redis almost nothing.

The pull loop cannot block in Redis: no blocking pop across many lists leaves the message safe
until it is filed as unacked (the pop stays one atomic Lua step). So it sleeps on an Event
instead, and this thread sets the Event when Redis says a served list was pushed to: keyspace
notifications (``__keyspace@DB__:LIST``, event ``lpush``/``rpush``...), which any Celery
client's publish and kombu's restore of a dead worker's jobs both cause. The loop clears the
Event *before* each pop, so a push between an empty pop and the wait is never slept through.

Pub/sub is at-most-once: a notification is lost while the subscription is down. So after every
(re)subscription the Event is set (the loop looks at once), the loop still looks every
``SAFETY_LOOK_S`` while armed, and a probe (a push to this worker's own probe list, which it
also subscribes to) checks every ``PROBE_EVERY_S`` that notifications really arrive. Where they
do not (``notify-keyspace-events`` off and CONFIG refused), ``armed`` is False and the loop
polls as it did before.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

import redis

from shared.keyspace_events import KEYSPACE_EVENTS, NOTIFY_SETTING
from shared.wire_text import printable

log = logging.getLogger("conveyor.wakeup")

PROBE_KEY_PREFIX = "conveyor:wake-probe:"
SAFETY_LOOK_S = 1.0  # armed: the longest an idle loop sleeps between two looks
PROBE_EVERY_S = 60.0  # armed: how often the probe checks that notifications still arrive
PROBE_EVERY_UNARMED_S = 15.0  # unarmed: how often to look whether notifications were turned on
PROBE_WAIT_S = 2.0  # a probe not heard back within this: notifications are off (or lost)
# Keyspace events that put an element on a list (the rest, pops and trims, wake nobody).
PUSH_EVENTS = frozenset({b"lpush", b"rpush", b"linsert", b"lset", b"restore", b"rename_to", b"copy_to", b"sortstore"})


class Wakeup(Protocol):
    """What the pull loop sleeps on while its queues are empty."""

    @property
    def armed(self) -> bool: ...  # True: a push wakes the loop, so it may sleep long

    def clear(self) -> None: ...

    def wake(self) -> None: ...  # end a wait now (something besides a push needs the loop)

    def wait(self, timeout: float) -> bool: ...

    def stop(self) -> None: ...


class KeyspaceWakeup:
    """Sets an Event when one of ``list_keys`` is pushed to (see the module's docstring)."""

    def __init__(
        self,
        client: redis.Redis,
        list_keys: Sequence[str],
        hostname: str,
        probe_every_s: float = PROBE_EVERY_S,
        probe_every_unarmed_s: float = PROBE_EVERY_UNARMED_S,
    ) -> None:
        self.client = client
        self.probe_every_s = probe_every_s
        self.probe_every_unarmed_s = probe_every_unarmed_s
        self._event = threading.Event()
        self._stop = threading.Event()
        self._armed = False
        self.probe_key = PROBE_KEY_PREFIX + printable(hostname)
        db = int(client.connection_pool.connection_kwargs.get("db", 0) or 0)
        self._prefix = f"__keyspace@{db}__:".encode()
        self._channels = [self._prefix.decode() + key for key in (*list_keys, self.probe_key)]
        self._probe_channel = (self._prefix.decode() + self.probe_key).encode()
        self._probe_sent: float | None = None  # when the probe in flight was pushed
        self._probed_at = 0.0
        self._warned = False
        self.wakeups = 0  # pushes heard (for tests and the benchmark)
        self._thread = threading.Thread(target=self._run, name="wakeup", daemon=True)

    def start(self) -> KeyspaceWakeup:
        self._thread.start()
        return self

    @property
    def armed(self) -> bool:
        return self._armed

    def clear(self) -> None:
        self._event.clear()

    def wake(self) -> None:
        self._event.set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        self._event.set()
        self._thread.join(5.0)

    # -- the listening thread ---------------------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            pubsub = self.client.pubsub()
            try:
                self._subscribe(pubsub)
                backoff = 0.1
                self._event.set()  # pushes made while we were not listening: look now
                self._probe()
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._heard(message.get("channel"), message.get("data"))
                    if not self._check_probe():
                        break  # notifications stopped arriving: subscribe afresh
            except Exception as exc:  # Redis away, a failover, a refused SUBSCRIBE: poll meanwhile
                if not isinstance(exc, redis.RedisError):
                    log.exception("wake-up listener failed")
                self._disarm(f"{type(exc).__name__}: {exc}")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                try:
                    pubsub.close()
                except Exception:  # closing a broken connection: nothing left to do
                    pass

    def _subscribe(self, pubsub: Any) -> None:
        pubsub.subscribe(*self._channels)
        confirmed, deadline = 0, time.monotonic() + 10.0
        while confirmed < len(self._channels):  # listening for sure before the probe and the look
            if time.monotonic() > deadline:
                raise redis.TimeoutError("no confirmation of the keyspace subscriptions in 10s")
            message = pubsub.get_message(timeout=1.0)
            if message is not None and message.get("type") == "subscribe":
                confirmed += 1
            elif message is not None and message.get("type") == "message":
                self._heard(message.get("channel"), message.get("data"))

    def _heard(self, channel: Any, data: Any) -> None:
        if channel == self._probe_channel:
            if data == b"lpush" and self._probe_sent is not None:
                self._probe_sent = None
                if not self._armed:
                    log.info("keyspace notifications arrive: idle, this worker waits for pushes")
                self._armed = True
            return
        if data in PUSH_EVENTS:
            self.wakeups += 1
            self._event.set()

    def _probe(self) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.lpush(self.probe_key, "1")
        pipe.delete(self.probe_key)
        pipe.execute()
        self._probe_sent = self._probed_at = time.monotonic()

    def _check_probe(self) -> bool:
        """Send a probe when one is due; False when the one sent went unheard."""
        now = time.monotonic()
        if self._probe_sent is not None:
            if now - self._probe_sent < PROBE_WAIT_S:
                return True
            self._probe_sent = None
            was_armed = self._armed
            self._disarm(f"no keyspace notification for a push within {PROBE_WAIT_S:.0f}s")
            return not was_armed  # armed until now: the subscription may be stale, renew it
        if now - self._probed_at > (self.probe_every_s if self._armed else self.probe_every_unarmed_s):
            self._probe()
        return True

    def _disarm(self, why: str) -> None:
        if self._armed or not self._warned:
            log.warning(
                "idle, this worker polls its queues (CONVEYOR_IDLE_POLL_MS): %s. Redis's %s must hold %r "
                "(`conveyor worker` sets it where CONFIG is allowed)", why, NOTIFY_SETTING, KEYSPACE_EVENTS,
            )  # fmt: skip
            self._warned = True
        self._armed = False
        self._event.set()  # whoever sleeps long on an armed wake-up looks now
