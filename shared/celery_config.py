"""Celery configuration shared by producers and workers: JSON only, results in Redis with
an expiry, late acknowledgement. Plain data, so ``shared`` does not import Celery."""

from __future__ import annotations

from typing import Any

from shared.names import QUEUES, TASKS
from shared.redis_connect import is_sentinel, sentinel_kwargs
from shared.settings import Settings


def celery_config(settings: Settings) -> dict[str, Any]:
    url = settings.broker_url()
    sentinel: dict[str, Any] = {}
    if is_sentinel(url):  # kombu's transport and Celery's SentinelBackend both ask the sentinels
        sentinel = {"master_name": settings.sentinel_master, "sentinel_kwargs": sentinel_kwargs(settings)}
    return {
        "broker_url": url,
        "result_backend": url,
        # JSON on the wire, both ways; pickle is refused by every consumer.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "result_expires": settings.result_ttl_s,
        "result_extended": True,  # keeps the task name and args beside the result, for `conveyor status ID`
        # STARTED is recorded for long jobs only (their tasks set track_started): for a
        # millisecond inference job it is one more Redis write per job and tells nobody anything.
        "task_track_started": False,
        # A job is acknowledged after it ran, and put back if its worker dies mid-way.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            # Sweep for a dead worker's jobs every few seconds (kombu's default is ~100 s).
            "unacked_restore_interval": 5,
            "unacked_restore_throttle": 1,
            # Priorities 0-9 through Redis's per-priority lists. kombu's default separator is
            # kept: every Celery client must agree on it, or their bindings do not parse.
            "priority_steps": list(range(10)),
            "queue_order_strategy": "priority",
            **sentinel,
        },
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout_s, **sentinel},
        "broker_connection_retry_on_startup": True,
        # A result written while Redis is away (a failover: ~3 s; a restart) is retried, not lost:
        # without this Celery's worker logs "Exception raised outside body", acknowledges the job
        # and its result never exists. 0.1 s doubling to 2 s, 30 times: about a minute.
        "result_backend_always_retry": True,
        "result_backend_max_retries": 30,
        "result_backend_base_sleep_between_retries_ms": 100,
        "result_backend_max_sleep_between_retries_ms": 2000,
        "task_routes": {TASKS[t]: {"queue": QUEUES[t]} for t in TASKS},
        # Flower shows jobs from the moment they are queued.
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "task_default_queue": QUEUES["classify"],
    }


def celery_priority(priority: int) -> int:
    """Conveyor's 9 is most urgent; Celery on Redis serves 0 first."""
    return 9 - priority
