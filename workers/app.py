"""The worker's Celery app. Started by ``workers.launch`` (``conveyor worker``), one process
per device, each with CUDA_VISIBLE_DEVICES set before torch is imported."""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis
from celery import Celery
from celery.signals import worker_ready, worker_shutdown
from celery.worker import state as worker_state

from shared.celery_config import celery_config
from shared.redis_clients import reuse_redis_clients
from shared.settings import Settings
from workers.leases import LeaseKeeper
from workers.runtime import Runtime

log = logging.getLogger(__name__)

reuse_redis_clients()
settings = Settings()
app = Celery("conveyor", set_as_current=True)
app.conf.update(celery_config(settings))
app.conf.update(
    # Each thread holds one job while it waits for its batch; the prefetch window must be
    # at least a batch wide or batches never fill.
    worker_prefetch_multiplier=1,
    worker_pool="threads",
    worker_concurrency=settings.concurrency(),
    worker_hijack_root_logger=False,
)

_runtime: Runtime | None = None
_runtime_lock = threading.Lock()
_leases: LeaseKeeper | None = None


def runtime() -> Runtime:
    """The process's runtime, built on first use (after the worker started, never at import)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = Runtime(settings)
        return _runtime


def _held_delivery_tags() -> list[str]:
    for _ in range(5):  # the sets change under us as jobs come and go; a retry is enough
        try:
            requests = list(worker_state.reserved_requests) + list(worker_state.active_requests)
            tags = (getattr(r.message, "delivery_tag", None) for r in requests)
            return [str(tag) for tag in tags if tag]
        except RuntimeError:
            continue
    return []


@worker_ready.connect
def _start_leases(**_: Any) -> None:
    global _leases
    client = redis.Redis.from_url(settings.broker_url())
    _leases = LeaseKeeper(client, _held_delivery_tags, settings.visibility_timeout_s).start()


@worker_ready.connect
def _warm_up(sender: Any = None, **_: Any) -> None:
    # Load the default model now so the first jobs do not pay for it. Only inference workers.
    queues = {q.name for q in getattr(sender, "app", app).amqp.queues.consume_from.values()}
    if "conveyor.classify" in queues:
        try:
            runtime().classify_batcher()
        except Exception:  # a missing model must not stop the worker; jobs will get the error
            log.exception("warm-up failed")


@worker_shutdown.connect
def _stop(**_: Any) -> None:
    if _leases is not None:
        _leases.stop()
    if _runtime is not None:
        _runtime.stop()


import workers.tasks  # noqa: E402,F401  - registers the tasks (needs `app` and `runtime` above)
