"""Run Flower with its /metrics and /healthcheck behind its login, with read-only logins, under the
read-only ``monitor`` Redis role.

- Flower 2.x serves /metrics and /healthcheck to anyone, even with ``--basic-auth``: their handlers
  lack the ``tornado.web.authenticated`` check every other page has. It is added here, so they
  answer 401 without a login, like the rest of Flower.
- Flower's logins (``FLOWER_BASIC_AUTH``, ``user:password`` pairs separated by commas) are all
  equal in Flower itself; its only other switch, ``--read_only``, is for the whole process. The
  logins named in ``CONVEYOR_FLOWER_READ_ONLY_USERS`` (commas) are refused (403) every request
  but GET and HEAD: they see every page and read the API, and control nothing (no revoke, no
  pool or rate changes, no send-task).
- Celery's event receiver only watches (producers.tenancy.monitor_process): no sweep of
  ``unacked`` (Flower holds no messages), no wake-up broadcast on the control channel.
- With ``CONVEYOR_FLOWER_WATCH_ONLY=1`` (how `conveyor up` runs it, under the monitor role) Flower
  sends no worker control commands at all: no ``inspect`` (its worker pages come from the workers'
  heartbeats and task events) and no periodic ``enable_events`` (workers send events anyway). The
  monitor role may not publish on the control channel, where Redis cannot tell inspect from shutdown.

Same arguments as ``celery``:

    python -m producers.flower_secure -A producers.flower_app flower --basic-auth=user:pw ...
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import sys
from typing import Any

import tornado.web

from producers.tenancy.monitor_process import READ_ONLY_USERS_ENV, WATCH_ONLY_ENV
from producers.tenancy.monitor_process import watch_only as watch_only_transport

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def protect_flower_endpoints() -> None:
    """Require Flower's login on /metrics and /healthcheck (idempotent)."""
    from flower.views import monitor

    for handler in (monitor.Metrics, monitor.Healthcheck):
        if not getattr(handler.get, "_conveyor_protected", False):
            handler.get = tornado.web.authenticated(handler.get)
            handler.get._conveyor_protected = True


def login_name(authorization: str) -> str | None:
    """The user of a ``Basic`` Authorization header, or None."""
    scheme, _, credentials = authorization.partition(" ")
    if scheme != "Basic":
        return None
    try:
        return base64.b64decode(credentials.strip(), validate=True).decode().partition(":")[0]
    except (binascii.Error, UnicodeDecodeError):
        return None


def read_only_logins(read_only: frozenset[str]) -> None:
    """Refuse (403) every request but GET and HEAD from the logins in ``read_only`` (idempotent)."""
    from flower.views import BaseHandler

    original = getattr(BaseHandler.get_current_user, "_conveyor_original", BaseHandler.get_current_user)

    def get_current_user(self: Any) -> Any:
        user = original(self)  # raises 401 for a wrong login
        if self.request.method not in READ_METHODS and login_name(self.request.headers.get("Authorization", "")) in (
            read_only
        ):
            raise tornado.web.HTTPError(403, "this Flower login is read-only")
        return user

    get_current_user._conveyor_original = original  # type: ignore[attr-defined]
    BaseHandler.get_current_user = get_current_user


def watch_only() -> None:
    """Flower sends no control commands (no inspect, no enable_events broadcast)."""
    from flower.inspector import Inspector

    async def _nothing() -> list[Any]:
        return []

    def inspect(self: Any, workername: str | None = None) -> Any:
        return asyncio.ensure_future(_nothing())

    Inspector.inspect = inspect
    os.environ["FLOWER_ENABLE_EVENTS"] = "false"


def main() -> None:
    protect_flower_endpoints()
    read_only_logins(frozenset(u for u in os.environ.get(READ_ONLY_USERS_ENV, "").split(",") if u))
    watch_only_transport()
    if os.environ.get(WATCH_ONLY_ENV) == "1":
        watch_only()
    from celery.bin.celery import main as celery_main

    sys.argv[0] = "celery"
    sys.exit(celery_main())


if __name__ == "__main__":
    main()
