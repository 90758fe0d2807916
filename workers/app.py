"""The worker's Celery app. Started by ``workers.launch`` (``conveyor worker``), one process
per device, each with CUDA_VISIBLE_DEVICES set before torch is imported.

An inference worker is an ordinary Celery worker (control commands, ``celery inspect``,
heartbeats, revokes, events) whose inference queues are taken off Celery's consumer at
start-up and served by the bulk ingest (``workers.ingest``) instead; Celery's consumer keeps
a per-node queue, so its loop (and kombu's visibility-timeout restore in it) runs as usual.
Training jobs take Celery's ordinary per-task path (``workers.tasks``).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import celeryd_after_setup, setup_logging, worker_ready, worker_shutdown
from celery.worker import control as worker_control
from celery.worker import state as worker_state
from kombu import Queue

from shared.celery_config import celery_config
from shared.log_format import configure_logging, job_event, set_context
from shared.names import BULK_QUEUES, INFERENCE_QUEUES, TRAINING_QUEUE
from shared.redis_clients import reuse_redis_clients
from shared.redis_connect import redis_client
from shared.settings import Settings
from shared.wire_text import printable
from workers.leases import LeaseKeeper
from workers.runtime import Runtime

log = logging.getLogger(__name__)

reuse_redis_clients()
settings = Settings()
app = Celery("conveyor", set_as_current=True, include=["workers.tasks"])
app.conf.update(celery_config(settings))
app.conf.update(
    worker_prefetch_multiplier=1,
    worker_pool="threads",
    worker_concurrency=settings.concurrency(),
    worker_hijack_root_logger=False,
)


class _Process:
    """What one worker process owns, built once the worker has started (never at import)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hostname = "unknown"
        self.runtime: Runtime | None = None
        self.ingest: Any = None
        self.ingest_queues: list[str] = []
        self.leases: LeaseKeeper | None = None
        self.metrics: Any = None
        self.presence: Any = None  # workers.presence.Presence: this worker's entry for `conveyor status`


process = _Process()


@setup_logging.connect
def _setup_logging(loglevel: Any = None, **_: Any) -> None:
    """Celery leaves its logging to us (shared/log_format: text or CONVEYOR_LOG_FORMAT=json)."""
    configure_logging("worker", loglevel or logging.INFO, settings.log_format)


@celeryd_after_setup.connect
def _log_context(sender: str, **_: Any) -> None:
    set_context(worker=sender)


def runtime() -> Runtime:
    """The process's runtime (models, batchers), built on first use."""
    with process.lock:
        if process.runtime is None:
            process.runtime = Runtime(settings, worker=process.hostname, on_batch=_on_batch)
        return process.runtime


def _on_batch(job_type: str, size: int, failed: bool) -> None:
    if process.ingest is not None:
        process.ingest.batch_ran()
    if process.presence is not None:
        process.presence.batch(size)
    if process.metrics is not None:
        process.metrics.batch(job_type, size)
        if failed:
            process.metrics.batch_failed(job_type)


@celeryd_after_setup.connect
def _take_inference_queues(sender: str, instance: Any, **_: Any) -> None:
    """Move the inference queues from Celery's consumer to the bulk ingest."""
    process.hostname = sender
    if not settings.ingest:
        return
    consumed = set(app.amqp.queues.consume_from)
    mine = [q for q in (*INFERENCE_QUEUES, *BULK_QUEUES.values(), TRAINING_QUEUE) if q in consumed]
    if not mine:
        return
    process.ingest_queues = mine
    app.amqp.queues.deselect(mine)
    # Celery's consumer needs a queue of its own: its loop runs control commands and kombu's
    # restore of messages whose worker died.
    app.amqp.queues.select_add(Queue(direct_queue(sender), routing_key=direct_queue(sender)))


@worker_control.inspect_command()
def active_queues(state: Any) -> list[dict[str, Any]]:
    """List the task queues a worker is currently consuming from (Celery's and the ingest's)."""
    consumer = state.consumer.task_consumer
    queues = list(consumer.queues) if consumer else []
    queues += [app.amqp.queues[name] for name in process.ingest_queues]
    return [dict(queue.as_dict(recurse=True)) for queue in queues]


def _held_delivery_tags() -> list[str]:
    tags: list[str] = []
    if process.ingest is not None:
        tags.extend(process.ingest.held_tags())
    for _ in range(5):  # the sets change under us as jobs come and go; a retry is enough
        try:
            requests = list(worker_state.reserved_requests) + list(worker_state.active_requests)
            found = (getattr(getattr(r, "message", None), "delivery_tag", None) for r in requests)
            return tags + [str(tag) for tag in found if tag]
        except RuntimeError:
            continue
    return tags


@worker_ready.connect
def _start(sender: Any = None, **_: Any) -> None:
    hostname = getattr(sender, "hostname", None) or process.hostname
    process.hostname = hostname
    client = redis_client(settings)
    try:
        from workers.metrics import WorkerMetrics

        process.metrics = WorkerMetrics(
            redis_client(settings), hostname, flush_every_s=settings.metrics_flush_s
        ).start()
    except Exception:  # metrics are for watching: never a reason not to serve
        log.exception("worker metrics are off")
    if process.ingest_queues:
        _start_ingest(hostname)
        if settings.heartbeat_file is not None:
            threading.Thread(target=_heartbeat, args=(settings.heartbeat_file,), name="heartbeat", daemon=True).start()
    process.leases = LeaseKeeper(client, _held_delivery_tags, settings.visibility_timeout_s).start()
    _start_presence(hostname)


def _start_presence(hostname: str) -> None:
    """This worker's entry in Redis (device, queues, models, batches/s), read by `conveyor status`."""
    from workers.presence import Presence

    try:
        training = process.ingest_queues == [TRAINING_QUEUE]
        queues = process.ingest_queues or sorted(app.amqp.queues.consume_from)
        process.presence = Presence(
            redis_client(settings), hostname, "training" if training else "inference",
            device=lambda: process.runtime.device if process.runtime is not None else settings.device,
            queues=[q for q in queues if not q.startswith("conveyor.direct.")],
            models=lambda: process.runtime.cache.keys() if process.runtime is not None else [],
            held=lambda: process.ingest.held if process.ingest is not None else len(worker_state.active_requests),
        ).start()  # fmt: skip
    except Exception:  # watching is never a reason not to serve
        log.exception("worker presence is off")


def direct_queue(hostname: str) -> str:
    return f"conveyor.direct.{hostname}"


def _celery_busy() -> bool:
    return bool(worker_state.active_requests or worker_state.reserved_requests)


def _start_ingest(hostname: str) -> None:
    from workers.ingest import Ingest
    from workers.task_events import TaskEvents

    if process.ingest_queues == [TRAINING_QUEUE]:
        _start_training_intake(hostname)
        return
    rt = runtime()
    if "conveyor.classify" in process.ingest_queues:
        try:  # load the default model now, so the first jobs do not pay for it
            rt.kind("classify")
        except Exception:  # a missing model must not stop the worker; jobs will get the error
            log.exception("warm-up failed")
    url = settings.broker_url()
    process.ingest = Ingest(
        redis_client(settings, url),
        rt,
        redis_client(settings, url),
        TaskEvents(app, hostname, settings.task_events),
        hostname=hostname,
        queues=[q for q in process.ingest_queues if q in INFERENCE_QUEUES],
        bulk_queues=[q for q in process.ingest_queues if q in BULK_QUEUES.values()],
        prefetch_items=settings.prefetch(),
        result_ttl_s=settings.result_ttl_s,
        time_limit_s=settings.inference_time_limit_s,
        max_retries=settings.max_retries,
        retry_backoff_s=settings.retry_backoff_s,
        max_deliveries=settings.max_deliveries,
        idle_poll_s=settings.idle_poll_ms / 1000.0,
        wakeup=_wakeup(
            hostname,
            [q for q in process.ingest_queues if q in INFERENCE_QUEUES],
            [q for q in process.ingest_queues if q in BULK_QUEUES.values()],
        ),  # fmt: skip
        wait_replicas=settings.wait_replicas,
        wait_timeout_ms=settings.wait_timeout_ms,
        revoked=worker_state.revoked,
        on_active=_on_active,
        on_outcome=_on_outcome,
        on_retry=_on_retry,
    ).start()
    log.info("bulk ingest serving %s", ", ".join(process.ingest_queues))


def _wakeup(hostname: str, queues: list[str], bulk_queues: list[str]) -> Any:
    """What wakes this worker's idle ingest: keyspace notifications for its lists (or None: poll)."""
    if settings.wakeup != "notify":
        return None
    from workers.ingest import served_lists
    from workers.wakeup import KeyspaceWakeup

    keys = [key for key, _ in served_lists(queues, bulk_queues)]
    return KeyspaceWakeup(redis_client(settings), keys, hostname).start()


def _start_training_intake(hostname: str) -> None:
    """Training messages through the ingest's intake, one at a time while Celery is idle, then
    handed to Celery's own task path on this worker's private queue (``workers.training_intake``)."""
    from shared.kinds import TRAINING_TYPES
    from workers.ingest import Ingest
    from workers.task_events import TaskEvents
    from workers.training_intake import CeleryHandoff

    # The producer already counted the job as sent; the hand-off is not a second send.
    handoff_app = Celery("conveyor-handoff", set_as_current=False)
    handoff_app.conf.update(celery_config(settings), task_send_sent_event=False)
    handoff = CeleryHandoff(handoff_app, direct_queue(hostname), _celery_busy)
    url = settings.broker_url()
    process.ingest = Ingest(
        redis_client(settings, url),
        handoff,  # type: ignore[arg-type]
        redis_client(settings, url),
        TaskEvents(app, hostname, "failures"),  # Celery's worker sends the events of the jobs it runs
        hostname=hostname,
        queues=[TRAINING_QUEUE],
        bulk_queues=[],
        prefetch_items=1,
        result_ttl_s=settings.result_ttl_s,
        time_limit_s=max(60.0, settings.inference_time_limit_s),  # held only until handed off
        max_retries=settings.max_retries,
        retry_backoff_s=settings.retry_backoff_s,
        max_deliveries=settings.max_deliveries,
        job_types=TRAINING_TYPES,
        accept=handoff.idle,
        idle_poll_s=max(0.05, settings.idle_poll_ms / 1000.0),
        wakeup=_wakeup(hostname, [TRAINING_QUEUE], []),
        wait_replicas=settings.wait_replicas,
        wait_timeout_ms=settings.wait_timeout_ms,
        revoked=worker_state.revoked,
        on_outcome=_on_outcome,  # a training message refused at intake is logged and counted too
    ).start()
    log.info("training intake serving %s", TRAINING_QUEUE)


def _heartbeat(path: Path) -> None:
    """Touch this worker's heartbeat file while it does its work: the ingest loop and the result
    writer turn, held jobs move, the lease keeper lives. The supervisor restarts a worker whose
    file goes stale (alive but no longer working). A worker whose memory passed
    CONVEYOR_MAX_MEMORY_MB drains and exits, and the supervisor starts a fresh one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    recycling_since: float | None = None
    while process.ingest is not None:
        try:
            problem = process.ingest.health(settings.worker_stall_s)
            if problem is None and process.leases is not None and not process.leases.alive():
                problem = "the lease keeper died"
            if problem is None:
                path.touch(mode=0o600)
            else:
                log.error("%s; letting the heartbeat lapse so the supervisor replaces this worker", problem)
            recycling_since = _maybe_recycle(recycling_since)
        except Exception:  # the heartbeat itself must not die silently: log, lapse, go on
            log.exception("heartbeat check failed")
        time.sleep(min(2.0, settings.worker_stall_s / 4))


def resident_mb() -> float:
    """This process's resident memory (Linux /proc; elsewhere the peak, from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _maybe_recycle(since: float | None) -> float | None:
    """Past the memory bound: take nothing new, and once the held jobs are written (or the drain
    time is up) stop warm, as a SIGTERM would; the held rest goes back to its queues."""
    ingest = process.ingest
    if ingest is None or settings.max_memory_mb <= 0:
        return since
    if since is None:
        rss = resident_mb()
        if rss <= settings.max_memory_mb:
            return None
        log.warning(
            "resident memory %.0f MB is over CONVEYOR_MAX_MEMORY_MB=%d; finishing held jobs, then recycling",
            rss, settings.max_memory_mb,
        )  # fmt: skip
        ingest.drain()
        since = time.monotonic()
    if ingest.held == 0 or time.monotonic() - since > settings.drain_timeout_s:
        log.warning("recycling this worker process (memory bound)")
        os.kill(os.getpid(), signal.SIGTERM)
    return since


def _on_active(entry: Any, running: bool) -> None:
    # `celery inspect active` and the heartbeat's active count read these sets.
    if running:
        worker_state.active_requests.add(entry)
    else:
        worker_state.active_requests.discard(entry)
        worker_state.total_count[entry.env.task or "unknown"] += 1
        worker_state.all_total_count[0] += 1


def _on_outcome(entry: Any, outcome: Any) -> None:
    try:
        _log_outcome(entry, outcome)
    except Exception:  # a log line must never cost a result
        log.exception("could not log the outcome of a job")
    if process.presence is not None and outcome.state:
        process.presence.job(outcome.state)
    metrics = process.metrics
    if metrics is None:
        return
    if outcome.dead_letter is not None:
        metrics.dead_lettered(outcome.env.queue or "unknown")
    if entry is not None and outcome.state:
        queue_s = max(0.0, entry.received - entry.job.submitted_at.timestamp())
        metrics.job(entry.job_type, outcome.state, queue_s, outcome.runtime)
    elif outcome.state:  # ended before it ran (invalid, expired, cancelled first): counted, run time 0
        kind = _kind_of(outcome.env.task)  # only the registry's kinds: the label stays bounded
        if kind is not None:
            metrics.job(kind, outcome.state, None, 0.0)


def _log_outcome(entry: Any, outcome: Any) -> None:
    """Every failed, dead-lettered or cancelled job once, with its id and reason (never its payload):
    the ingest calls ``on_outcome`` once per job that ends here."""
    if outcome.state not in ("FAILURE", "REVOKED") and outcome.dead_letter is None:
        return
    env = outcome.env
    job_id = printable(env.id) if env.id else None
    kind = entry.job_type if entry is not None else _kind_of(env.task)
    exc = outcome.result if isinstance(outcome.result, BaseException) else None
    error = printable(str(exc), 500) if exc is not None else printable(outcome.dead_letter or "", 500)
    fields: dict[str, Any] = {
        "job_id": job_id, "kind": kind, "queue": printable(env.queue) if env.queue else None,
        "error_type": type(exc).__name__ if exc is not None else "InvalidJob", "error": error,
        "duration_s": round(outcome.runtime, 6) if outcome.runtime else None,
        "retries": getattr(env, "retries", None) or None,
        "reason": printable(outcome.dead_letter, 500) if outcome.dead_letter is not None else None,
    }  # fmt: skip
    if outcome.state == "REVOKED":
        job_event(log, logging.INFO, "job_cancelled", f"job {job_id} cancelled: {error}", **fields)
    elif outcome.state == "FAILURE":
        dead = " and dead-lettered" if outcome.dead_letter is not None else ""
        job_event(log, logging.WARNING, "job_failed", f"job {job_id} failed{dead}: {error}", **fields)
    else:  # refused at intake; its client (where the id could be read) gets a FAILURE as well
        job_event(log, logging.WARNING, "job_dead_lettered", f"message {job_id or '(no id)'} dead-lettered: {error}",
                  **fields)  # fmt: skip


def _kind_of(task: str | None) -> str | None:
    from shared.names import TASKS

    return next((kind for kind, name in TASKS.items() if name == task), None)


def _on_retry(entry: Any) -> None:
    try:  # one record per retry, beside the ingest's own line: the id and attempt as fields
        job_id = printable(entry.id) if entry.id else None
        job_event(log, logging.INFO, "job_retried", f"job {job_id} failed transiently; retry {entry.attempts}",
                  job_id=job_id, kind=entry.job_type, retries=entry.attempts)  # fmt: skip
    except Exception:
        log.exception("could not log a retry")
    if process.metrics is not None:
        process.metrics.retried(entry.job_type)


@worker_shutdown.connect
def _stop(**_: Any) -> None:
    if process.ingest is not None:
        process.ingest.stop(timeout=settings.drain_timeout_s)
    if process.leases is not None:
        process.leases.stop()
    if process.runtime is not None:
        process.runtime.stop()
    if process.metrics is not None:
        process.metrics.stop()
    if process.presence is not None:
        process.presence.stop()
