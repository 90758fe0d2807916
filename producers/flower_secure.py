"""Run Flower with its /metrics and /healthcheck behind its login.

Flower 2.x serves those two pages to anyone, even with ``--basic-auth``: their handlers lack
the ``tornado.web.authenticated`` check every other page has. This runs the ``celery`` command
in this process after adding that check to them, so they answer 401 without the login, like
the rest of Flower. Same arguments as ``celery``:

    python -m producers.flower_secure -A producers.flower_app flower --basic-auth=user:pw ...
"""

from __future__ import annotations

import sys

import tornado.web


def protect_flower_endpoints() -> None:
    """Require Flower's login on /metrics and /healthcheck (idempotent)."""
    from flower.views import monitor

    for handler in (monitor.Metrics, monitor.Healthcheck):
        if not getattr(handler.get, "_conveyor_protected", False):
            handler.get = tornado.web.authenticated(handler.get)
            handler.get._conveyor_protected = True


def main() -> None:
    protect_flower_endpoints()
    from celery.bin.celery import main as celery_main

    sys.argv[0] = "celery"
    sys.exit(celery_main())


if __name__ == "__main__":
    main()
