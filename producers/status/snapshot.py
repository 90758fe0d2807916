"""One reading of everything `conveyor status` shows, from Redis alone, in three round trips:
the workers' own entries (``shared/worker_presence.py``) and last metrics flushes, the queues
(``producers/queue_stats.py``: one Lua call), and the job totals the workers add up
(``producers/job_stats.py``). No Celery broadcast: that is ``--inspect``'s, and costs a second
or more. The same numbers the exporter serves, so the view and Grafana agree."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from pydantic import ValidationError

from producers.job_stats import JobTotals, read_totals
from producers.queue_stats import QueueStats, dead_letter_count, read_queues
from shared.names import ALL_QUEUES
from shared.worker_presence import MAX_ENTRY_BYTES, PRESENCE_KEY, WorkerPresence

QUANTILES = (0.5, 0.95)


@dataclass(frozen=True)
class WorkerRow:
    hostname: str
    up: bool
    heartbeat_age_s: float | None  # seconds since its last entry or metrics flush
    presence: WorkerPresence | None  # None: a worker that flushes metrics but writes no entry


@dataclass(frozen=True)
class KindRow:
    kind: str
    states: dict[str, int]  # SUCCESS, FAILURE, REVOKED -> jobs
    batches: int
    mean_batch_size: float | None
    run_s: dict[float, float | None]  # quantile -> seconds
    wait_s: dict[float, float | None]
    mean_run_s: float | None
    mean_wait_s: float | None
    retries: int
    batch_failures: int


@dataclass(frozen=True)
class Snapshot:
    taken_at: float
    workers: list[WorkerRow]
    queues: list[QueueStats]
    dead_letter_queue: int
    dead_lettered: dict[str, int]  # queue -> jobs moved to the dead-letter queue since counting began
    kinds: list[KindRow]
    totals: JobTotals = field(repr=False)
    inspected: dict[str, Any] | None = None  # --inspect: Celery's broadcast replies


def read_snapshot(client: redis.Redis, worker_timeout_s: float = 15.0, forget_after_s: float = 600.0) -> Snapshot:
    now = time.time()
    entries = client.hgetall(PRESENCE_KEY)
    queues = read_queues(client, ALL_QUEUES, now=now)
    totals = read_totals(client)
    return Snapshot(
        taken_at=now,
        workers=_workers(entries, totals.last_flush, now, worker_timeout_s, forget_after_s),
        queues=queues,
        dead_letter_queue=dead_letter_count(client),
        dead_lettered={q: int(n) for q, n in sorted(totals.dead_letters.items())},
        kinds=_kinds(totals),
        totals=totals,
    )


def _workers(
    entries: dict[Any, Any], flushes: dict[str, float], now: float, timeout_s: float, forget_s: float
) -> list[WorkerRow]:
    rows: dict[str, WorkerRow] = {}
    for raw in entries.values():
        if len(raw) > MAX_ENTRY_BYTES:
            continue
        try:
            entry = WorkerPresence.model_validate_json(raw)
        except (ValidationError, ValueError):
            continue  # another version's or damaged: never a reason to hide the rest
        age = max(0.0, now - entry.beat_at)
        if age <= forget_s:
            rows[entry.hostname] = WorkerRow(entry.hostname, age <= timeout_s, age, entry)
    for name, flushed in flushes.items():  # workers without an entry (an older release) still show
        age = max(0.0, now - flushed)
        if name not in rows and age <= forget_s:
            rows[name] = WorkerRow(name, age <= timeout_s, age, None)
    return sorted(rows.values(), key=lambda w: (not w.up, w.hostname))


def _kinds(totals: JobTotals) -> list[KindRow]:
    names = {kind for kind, _ in totals.jobs} | set(totals.batch_failures) | set(totals.retries)
    for per_type in totals.histograms.values():
        names |= set(per_type)
    rows = []
    for kind in sorted(names):
        batch = totals.histograms.get("batch_size", {}).get(kind)
        run = totals.histograms.get("run_seconds", {}).get(kind)
        wait = totals.histograms.get("queue_wait_seconds", {}).get(kind)
        rows.append(
            KindRow(
                kind=kind,
                states={state: int(n) for (k, state), n in sorted(totals.jobs.items()) if k == kind and n},
                batches=int(batch.count) if batch else 0,
                mean_batch_size=batch.mean() if batch else None,
                run_s={q: run.quantile(q) if run else None for q in QUANTILES},
                wait_s={q: wait.quantile(q) if wait else None for q in QUANTILES},
                mean_run_s=run.mean() if run else None,
                mean_wait_s=wait.mean() if wait else None,
                retries=int(totals.retries.get(kind, 0)),
                batch_failures=int(totals.batch_failures.get(kind, 0)),
            )
        )
    return rows


def as_json(snap: Snapshot) -> dict[str, Any]:
    """`conveyor status --json`: the layout it always had (workers, queues, dead_letter_queue,
    dead_lettered, jobs), with each worker's entry and the latency quantiles added."""
    return {
        "workers": {w.hostname: _worker_json(w, snap.inspected) for w in snap.workers},
        "queues": {
            q.queue: {
                "length": q.length,
                "by_priority": {str(p): n for p, n in sorted(q.by_priority.items(), reverse=True) if n},
                "oldest_age_s": None if q.oldest_age_s is None else round(q.oldest_age_s, 3),
            }
            for q in snap.queues
        },
        "dead_letter_queue": snap.dead_letter_queue,
        "dead_lettered": snap.dead_lettered,
        "jobs": {k.kind: _kind_json(k, snap.totals) for k in snap.kinds},
    }


def _worker_json(w: WorkerRow, inspected: dict[str, Any] | None) -> dict[str, Any]:
    p = w.presence
    out: dict[str, Any] = {
        "up": w.up,
        "last_heartbeat_s": None if w.heartbeat_age_s is None else round(w.heartbeat_age_s, 1),
        "active": p.held if p else None,
        "queues": p.queues if p else [],
    }
    if p is not None:
        out.update(
            role=p.role, device=p.device, models=p.models, pid=p.pid, batches=p.batches,
            batches_per_s=p.batches_per_s, succeeded=p.succeeded, failed=p.failed,
        )  # fmt: skip
    if inspected is not None and w.hostname in inspected:
        out.update(inspected[w.hostname])  # Celery's own answer wins where it has one
    return out


def _kind_json(k: KindRow, totals: JobTotals) -> dict[str, Any]:
    out: dict[str, Any] = dict(k.states)
    if k.batches:
        out["batches"] = k.batches
        out["mean_batch_size"] = None if k.mean_batch_size is None else round(k.mean_batch_size, 2)
    if k.kind in totals.histograms.get("queue_wait_seconds", {}):
        out["mean_queue_wait_s"] = None if k.mean_wait_s is None else round(k.mean_wait_s, 4)
        for q, v in k.wait_s.items():
            out[f"queue_wait_p{round(q * 100)}_s"] = None if v is None else round(v, 4)
    if k.kind in totals.histograms.get("run_seconds", {}):
        out["mean_run_s"] = None if k.mean_run_s is None else round(k.mean_run_s, 4)
        for q, v in k.run_s.items():
            out[f"run_p{round(q * 100)}_s"] = None if v is None else round(v, 4)
    if k.batch_failures:
        out["batch_failures"] = k.batch_failures
    if k.retries:
        out["retries"] = k.retries
    return out


def dumps(snap: Snapshot) -> str:
    return json.dumps(as_json(snap), indent=2, default=str)
