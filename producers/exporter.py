"""`conveyor exporter`: Conveyor's Prometheus metrics on CONVEYOR_METRICS_PORT (started by
`conveyor up`). Never imports torch or the workers.

Two sources, read at each scrape or as they come:

- Redis, at scrape time: queue lengths (per queue and per priority), the age of the oldest
  waiting job, the dead-letter queue, and the job totals the workers' recorders
  (workers/metrics.py) add up in Redis: jobs by state, batch sizes, queue wait and run time,
  whole-batch failures, retries, dead-lettered jobs. These are cluster-wide numbers: every
  exporter reads the same ones, so with several exporters aggregate with ``max``, not ``sum``.
- Celery events, as they come (as celery-exporter does): ``celery_worker_up`` and
  ``celery_worker_tasks_active`` from heartbeats, ``celery_task_*_total`` and
  ``celery_task_runtime`` from task events. Workers may send only some task events (or none), so
  job counts by state come from Redis, not from these. Counters start at zero when the exporter
  starts, which Prometheus' ``rate`` and ``increase`` expect. Any Celery client can send events,
  so every label taken from one is bounded (``BoundedLabel``).

Names and labels follow celery-exporter where it has them (``celery_queue_length{queue_name}``,
``celery_worker_up{hostname}``, ``celery_task_sent_total{name,hostname,queue_name}``,
``celery_task_failed_total{...,exception}``), so its Grafana boards work beside Conveyor's own
(scripts/grafana/conveyor.json). The endpoint asks for Flower's login (basic auth) unless CONVEYOR_METRICS_AUTH is
false, and listens on 127.0.0.1 unless CONVEYOR_METRICS_ADDRESS says otherwise.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hmac
import logging
import math
import re
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import redis
from celery import Celery
from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from producers.job_stats import read_totals
from producers.queue_stats import FirstSeen, dead_letter_count, read_queues
from shared.celery_config import celery_config
from shared.names import ALL_QUEUES, JOB_TYPES, QUEUES, TASKS
from shared.redis_connect import redis_client
from shared.settings import Settings

log = logging.getLogger("conveyor.exporter")

# celery-exporter's task event counters: event type -> metric name (exposed with _total).
TASK_EVENTS = {
    "task-sent": "celery_task_sent",
    "task-received": "celery_task_received",
    "task-started": "celery_task_started",
    "task-succeeded": "celery_task_succeeded",
    "task-failed": "celery_task_failed",
    "task-rejected": "celery_task_rejected",
    "task-revoked": "celery_task_revoked",
    "task-retried": "celery_task_retried",
}
HISTOGRAM_HELP = {
    "batch_size": ("conveyor_batch_size", "Items per forward pass."),
    "queue_wait_seconds": ("conveyor_job_queue_wait_seconds", "Seconds from submission to the start of the job."),
    "run_seconds": ("conveyor_job_run_seconds", "Seconds from the start of the job to its result."),
}
TASK_LABELS = ["name", "hostname", "queue_name"]
TASK_NAMES_KEPT = 10_000  # uuid -> (task name, queue), for events that carry only the uuid
# Label values per exporter from events, beyond Conveyor's own task names and queues; more
# count as "other" (BoundedLabel).
MAX_EXCEPTION_LABELS = 50
MAX_NAME_LABELS = 50
MAX_QUEUE_LABELS = 50
MAX_HOSTNAME_LABELS = 1000
MAX_LABEL_CHARS = 200
# Task name -> the queue Conveyor's registry sends it to (a bulk job's task-sent names its own).
DEFAULT_QUEUES: dict[str, str] = {TASKS[kind]: QUEUES[kind] for kind in JOB_TYPES}
_EXCEPTION_CLASS = re.compile(r"^([A-Za-z_][\w.]{0,200})\(")
_PRODUCER_NODE = re.compile(r"^gen\d+@")  # Celery's node name for a process that is not a worker


class RedisCollector:
    """Everything read from Redis, read afresh at each scrape (one script and one pipeline)."""

    def __init__(self, client: redis.Redis, forget_worker_s: float = 600.0) -> None:
        self.client = client
        self.forget_worker_s = forget_worker_s
        self.first_seen = FirstSeen()
        self._lock = threading.Lock()  # FirstSeen is not shared between concurrent scrapes

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("conveyor_redis_up", "1 if the exporter read Redis at this scrape.")
        try:
            with self._lock:
                queues = read_queues(self.client, first_seen=self.first_seen)
            dead = dead_letter_count(self.client)
            totals = read_totals(self.client)
        except (redis.RedisError, OSError) as exc:
            log.warning("scrape: cannot read Redis: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        length = GaugeMetricFamily("celery_queue_length", "Jobs waiting in the queue.", labels=["queue_name"])
        by_priority = GaugeMetricFamily(
            "conveyor_queue_length_by_priority",
            "Jobs waiting, by Conveyor priority (9 most urgent).",
            labels=["queue_name", "priority"],
        )
        oldest = GaugeMetricFamily(
            "conveyor_queue_oldest_age_seconds",
            "Age of the oldest waiting job (0 when the queue is empty).",
            labels=["queue_name"],
        )
        for q in queues:
            length.add_metric([q.queue], q.length)
            for priority, n in sorted(q.by_priority.items()):
                by_priority.add_metric([q.queue, str(priority)], n)
            if q.oldest_age_s is not None:
                oldest.add_metric([q.queue], q.oldest_age_s)
        yield from (length, by_priority, oldest)

        dlq = GaugeMetricFamily("conveyor_dead_letter_queue_length", "Jobs in the dead-letter queue.")
        dlq.add_metric([], dead)
        yield dlq

        jobs = CounterMetricFamily("conveyor_jobs", "Finished jobs, by type and state.", labels=["job_type", "state"])
        for (job_type, state), finished in sorted(totals.jobs.items()):
            jobs.add_metric([job_type, state], finished)
        yield jobs
        for name, per_type in totals.histograms.items():
            metric, help_text = HISTOGRAM_HELP[name]
            histogram = HistogramMetricFamily(metric, help_text, labels=["job_type"])
            for job_type, hist in sorted(per_type.items()):
                buckets = [(_le(bound), below) for bound, below in hist.cumulative()]
                histogram.add_metric([job_type], buckets, sum_value=hist.sum)
            yield histogram
        # Rare events: every kind (queue) is listed from 0, so rate() and alerts see a series
        # before the first one happens.
        for metric, help_text, label, values, known in (
            ("conveyor_batch_failures", "Batches that raised as a whole.", "job_type", totals.batch_failures,
             JOB_TYPES),
            ("conveyor_job_retries", "Job retries.", "job_type", totals.retries, JOB_TYPES),
            ("conveyor_dead_letter", "Jobs moved to the dead-letter queue.", "queue_name", totals.dead_letters,
             ALL_QUEUES),
        ):  # fmt: skip
            counter = CounterMetricFamily(metric, help_text, labels=[label])
            for key, total in sorted({**dict.fromkeys(known, 0.0), **values}.items()):
                counter.add_metric([key], total)
            yield counter
        flushed = GaugeMetricFamily(
            "conveyor_worker_metrics_flushed_timestamp_seconds",
            "When each worker last added its job counts to Redis (unix time).",
            labels=["hostname"],
        )
        cutoff = time.time() - self.forget_worker_s
        for worker, at in sorted(totals.last_flush.items()):
            if at >= cutoff:
                flushed.add_metric([worker], at)
        yield flushed


class TaskLabels:
    """The ``name`` and ``queue_name`` of a task by its uuid, for events that carry only the uuid.

    ``task-sent`` names the queue (Celery puts it in the event); an event for a task whose
    sending this exporter did not see (sent before it started, or by a client that sends no
    ``task-sent``) gets the queue Conveyor's registry routes that task name to. Only the last
    ``TASK_NAMES_KEPT`` tasks are remembered."""

    def __init__(self, kept: int = TASK_NAMES_KEPT) -> None:
        self.kept = kept
        self._by_uuid: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._lock = threading.Lock()

    def of(self, event: dict[str, Any]) -> tuple[str, str]:
        uuid = str(event.get("uuid", ""))[:MAX_LABEL_CHARS]
        name, queue = event.get("name"), event.get("queue")
        with self._lock:
            known = self._by_uuid.get(uuid)
            if not name and known is not None:
                return known
            name = str(name or "unknown")[:MAX_LABEL_CHARS]
            queue = (
                str(queue)[:MAX_LABEL_CHARS] if queue else (known[1] if known else DEFAULT_QUEUES.get(name, "unknown"))
            )
            self._by_uuid[uuid] = (name, queue)
            self._by_uuid.move_to_end(uuid)
            if len(self._by_uuid) > self.kept:
                self._by_uuid.popitem(last=False)
            return name, queue


class BoundedLabel:
    """One label's values from events that any Celery client can send: the ``known`` values
    (Conveyor's task names, its queues) always, and at most ``limit`` others, each cut to
    ``MAX_LABEL_CHARS``; later new ones count as ``other``, so odd clients cannot grow the
    exporter's series without bound."""

    def __init__(self, limit: int, known: Iterable[str] = ()) -> None:
        self.limit = limit
        self.known = frozenset(known)
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def of(self, value: object) -> str:
        text = value if isinstance(value, str) else str(value)
        if text in self.known:
            return text
        text = text[:MAX_LABEL_CHARS]
        with self._lock:
            if text in self._seen:
                return text
            if len(self._seen) >= self.limit:
                return "other"
            self._seen.add(text)
            return text

    def forget(self, value: str) -> None:
        with self._lock:
            self._seen.discard(value)


def exception_name(exception: object) -> str:
    """The ``exception`` label, as celery-exporter gives it: the class name of the event's
    exception repr (``InvalidJob('...')`` -> ``InvalidJob``), never its message."""
    found = _EXCEPTION_CLASS.match(exception if isinstance(exception, str) else "")
    return found.group(1).rpartition(".")[2] if found else "UnknownException"


class CeleryEvents:
    """A Celery event receiver in a thread: worker heartbeats and task events."""

    def __init__(
        self,
        app: Celery,
        registry: CollectorRegistry,
        worker_timeout_s: float = 15.0,
        forget_worker_s: float = 600.0,
        generic_sent_hostname: bool = False,
    ) -> None:
        self.app = app
        self.worker_timeout_s = worker_timeout_s
        self.forget_worker_s = forget_worker_s
        self.generic_sent_hostname = generic_sent_hostname
        failed_labels = [*TASK_LABELS, "exception"]
        self.counters = {
            event: Counter(
                metric, f"Celery {event} events.", failed_labels if event == "task-failed" else TASK_LABELS,
                registry=registry,
            )
            for event, metric in TASK_EVENTS.items()
        }  # fmt: skip
        self.runtime = Histogram(
            "celery_task_runtime", "Task runtime (seconds), from task-succeeded events.", TASK_LABELS,
            registry=registry, buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
        )  # fmt: skip
        self.tasks = TaskLabels()
        self.names = BoundedLabel(MAX_NAME_LABELS, DEFAULT_QUEUES)
        self.queues = BoundedLabel(MAX_QUEUE_LABELS, ALL_QUEUES)
        self.hostnames = BoundedLabel(MAX_HOSTNAME_LABELS)
        self.exceptions = BoundedLabel(MAX_EXCEPTION_LABELS)
        # worker hostname -> its (name, queue, exception or None) label sets
        self._series: dict[str, set[tuple[str, str, str | None]]] = {}
        # hostname -> (last seen, online, tasks active from its last worker event)
        self._workers: dict[str, tuple[float, bool, int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._receiver: Any = None
        self._thread = threading.Thread(target=self._run, name="celery-events", daemon=True)
        self.connected = threading.Event()

    def start(self) -> CeleryEvents:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with self.app.connection_for_read() as conn:
                    self._receiver = self.app.events.Receiver(conn, handlers={"*": self.on_event})
                    self.connected.set()
                    # wakeup: every live worker sends a heartbeat now, so they show at once.
                    self._receiver.capture(limit=None, timeout=None, wakeup=True)
            except Exception as exc:  # the receiver must outlive broker hiccups
                self.connected.clear()
                if not self._stop.is_set():
                    log.warning("celery events: %s; reconnecting in 1 s", exc)
                    self._stop.wait(1.0)

    def on_event(self, event: dict[str, Any]) -> None:
        # Any Celery client can send events: nothing in one is trusted to have its type or size.
        kind = str(event.get("type", ""))
        node = str(event.get("hostname", "unknown"))[:MAX_LABEL_CHARS]
        if kind.startswith("worker-"):
            self._worker_event(kind, node, event.get("active"))
            return
        counter = self.counters.get(kind)
        if counter is None:
            return
        name, queue = self.tasks.of(event)
        if kind == "task-sent":
            # A producer's Celery node name is gen<pid>@host: one series per process without this.
            node = "generic" if self.generic_sent_hostname else _PRODUCER_NODE.sub("", node)
        labels = {"name": self.names.of(name), "hostname": self.hostnames.of(node), "queue_name": self.queues.of(queue)}
        if kind == "task-sent":
            counter.labels(**labels).inc()
            return
        self._zero(labels)
        if kind == "task-failed":
            exception = self.exceptions.of(exception_name(event.get("exception")))
            self._remember(labels, exception)
            counter.labels(**labels, exception=exception).inc()
        else:
            counter.labels(**labels).inc()
        runtime = event.get("runtime")
        if kind == "task-succeeded" and isinstance(runtime, int | float) and 0 <= runtime < math.inf:
            self.runtime.labels(**labels).observe(runtime)

    def _worker_event(self, kind: str, hostname: str, active: object) -> None:
        online = kind != "worker-offline"
        # Every worker event carries Celery's count of requests in progress (the ingest's
        # running jobs are among them, see workers/app.py).
        running = int(active) if online and isinstance(active, int) and active >= 0 else 0
        with self._lock:
            if hostname in self._workers or len(self._workers) < MAX_HOSTNAME_LABELS:
                self._workers[hostname] = (time.monotonic(), online, running)

    def _zero(self, labels: dict[str, str]) -> None:
        """Make a worker's task counters exist at 0 from its first event for that task, as
        celery-exporter does, so rates and ratios have a series to work on (not task-sent: its
        hostnames are the producers')."""
        if not self._remember(labels, None):
            return
        for kind, counter in self.counters.items():
            if kind == "task-failed":
                counter.labels(**labels, exception="")
            elif kind != "task-sent":
                counter.labels(**labels)

    def _remember(self, labels: dict[str, str], exception: str | None) -> bool:
        """Note a worker's label set (to drop its series when the worker is forgotten); True if new."""
        key = (labels["name"], labels["queue_name"], exception)
        with self._lock:
            mine = self._series.setdefault(labels["hostname"], set())
            if key in mine:
                return False
            mine.add(key)
            return True

    def _forget(self, hostname: str) -> None:
        """Drop a long-gone worker's task series and free its hostname's place (as
        celery-exporter purges offline workers), so a fleet that renames its workers (pods)
        does not fill the exporter."""
        for name, queue, exception in self._series.pop(hostname, ()):
            # (name, queue, None) stands for the set _zero made: every counter, failures with exception "".
            failed = (name, hostname, queue, exception or "")
            with contextlib.suppress(KeyError):
                self.counters["task-failed"].remove(*failed)
            if exception is not None:
                continue
            for kind, counter in self.counters.items():
                if kind not in ("task-sent", "task-failed"):
                    with contextlib.suppress(KeyError):
                        counter.remove(name, hostname, queue)
            with contextlib.suppress(KeyError):
                self.runtime.remove(name, hostname, queue)
        self.hostnames.forget(hostname)

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("celery_worker_up", "1 if the worker sent a heartbeat recently.", labels=["hostname"])
        active = GaugeMetricFamily(
            "celery_worker_tasks_active", "Tasks the worker is running, from its last heartbeat.", labels=["hostname"]
        )
        now = time.monotonic()
        with self._lock:
            for hostname, (seen, online, running) in list(self._workers.items()):
                alive = online and now - seen <= self.worker_timeout_s
                if not alive and now - seen > self.worker_timeout_s + self.forget_worker_s:
                    del self._workers[hostname]
                    self._forget(hostname)
                    continue
                up.add_metric([hostname], 1 if alive else 0)
                active.add_metric([hostname], running if alive else 0)
        yield up
        yield active


def basic_auth(app: Callable[..., Iterable[bytes]], user: str, password: str) -> Callable[..., Iterable[bytes]]:
    """WSGI middleware: 401 unless the request carries this login."""
    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if hmac.compare_digest(environ.get("HTTP_AUTHORIZATION", "").encode(), expected.encode()):
            return app(environ, start_response)
        start_response(
            "401 Unauthorized", [("WWW-Authenticate", 'Basic realm="conveyor"'), ("Content-Type", "text/plain")]
        )
        return [b"login required\n"]

    return guarded


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class Exporter:
    """The registry, the event receiver and the HTTP server, started and stopped together."""

    def __init__(self, settings: Settings, address: str | None = None, port: int | None = None) -> None:
        self.settings = settings
        self.address = address or settings.metrics_address
        self.port = settings.metrics_port if port is None else port
        url = settings.broker_url()
        self.redis = redis_client(settings, url, socket_timeout=10, socket_connect_timeout=5)
        self.app = Celery("conveyor-exporter", set_as_current=False)
        self.app.conf.update(celery_config(settings))
        self.registry = CollectorRegistry()
        self.registry.register(RedisCollector(self.redis, settings.metrics_forget_worker_s))
        from producers.tenancy.metrics import TenantCollector  # per tenant: bounded by MAX_TENANTS

        self.registry.register(TenantCollector(self.redis, settings))
        self.events = CeleryEvents(
            self.app,
            self.registry,
            settings.metrics_worker_timeout_s,
            settings.metrics_forget_worker_s,
            generic_sent_hostname=settings.metrics_generic_sent_hostname,
        )
        self.registry.register(self.events)
        wsgi = make_wsgi_app(self.registry)
        if settings.metrics_auth:
            from producers.stack import flower_login

            wsgi = basic_auth(wsgi, *flower_login(settings))
        self.server = make_server(self.address, self.port, wsgi, server_class=_Server, handler_class=_QuietHandler)
        self.port = self.server.server_port
        self._thread = threading.Thread(target=self.server.serve_forever, name="http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.address}:{self.port}/metrics"

    def start(self) -> Exporter:
        self.events.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.events.stop()
        self.redis.close()
        self.app.close()


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else floatToGoString(bound)


def exporter_url(settings: Settings) -> str:
    return f"http://{settings.metrics_address}:{settings.metrics_port}/metrics"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conveyor exporter", description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", help="listen address (default CONVEYOR_METRICS_ADDRESS)")
    parser.add_argument("--port", type=int, help="listen port (default CONVEYOR_METRICS_PORT)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = Settings()
    try:
        exporter = Exporter(settings, args.address, args.port).start()
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    login = "Flower's login" if settings.metrics_auth else "no login"
    log.info("metrics on %s (%s); queues: %s", exporter.url, login, ", ".join(ALL_QUEUES))
    stop.wait()
    exporter.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
