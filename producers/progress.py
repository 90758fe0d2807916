"""Live progress bars (rich) for long work seen from the CLI: bulk scoring, and train or
fine-tune jobs followed through their PROGRESS state. Bars go to stderr, so stdout stays
for results."""

from __future__ import annotations

import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn

if TYPE_CHECKING:
    from producers.client import JobHandle
    from producers.score.run import ScoreProgress, ScoreSummary


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    whole = round(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


class ScoreBar:
    """rows done / total, rows/s, errors, ETA; the summary line at the end."""

    def __init__(self, description: str, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[rows]} rows"),
            TextColumn("{task.fields[rate]:,.1f} rows/s"),
            TextColumn("{task.fields[errors]:,} errors"),
            TextColumn("ETA {task.fields[eta]}"),
            console=self.console,
            refresh_per_second=4,
        )
        self._task: TaskID = self._progress.add_task(
            description, total=None, rows="-", rate=0.0, errors=0, eta=_duration(None)
        )

    def __enter__(self) -> ScoreBar:
        self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.stop()

    def update(self, p: ScoreProgress) -> None:
        if p.phase == "writing":
            self._progress.update(self._task, description="writing output")
        self._progress.update(
            self._task,
            total=p.total,
            completed=p.done,
            rows=f"{p.done:,}/{p.total:,}",
            rate=p.rows_per_s,
            errors=p.errors,
            eta=_duration(0.0 if p.done >= p.total else p.eta_s),
        )


def summary_line(s: ScoreSummary) -> str:
    resumed = f" ({s.resumed:,} done before this session)" if s.resumed else ""
    return (
        f"{s.rows:,} rows{resumed}, {s.errors:,} errors, {_duration(s.elapsed_s)}, "
        f"{s.rows_per_s:,.1f} rows/s -> {s.out}"
    )


def follow_long_job(handle: JobHandle, timeout: float, console: Console | None = None) -> None:
    """Show a train/fine-tune job's epoch, step, loss and ETA until it finishes (or ``timeout``)."""
    console = console or Console(stderr=True)
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("epoch {task.fields[epoch]}"),
        TextColumn("step {task.fields[step]}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[rate]}"),
        TextColumn("ETA {task.fields[eta]}"),
        console=console,
        refresh_per_second=4,
    )
    task = progress.add_task(f"{handle.type or 'job'} {handle.id[:8]}: queued", total=None,
                             epoch="-", step="-", loss="-", rate="", eta=_duration(None))  # fmt: skip
    end = time.monotonic() + timeout
    with _Live(progress):
        while time.monotonic() < end:
            status = handle.status()
            if status.done:
                return
            p = status.progress
            if p is not None:
                total = max(p.epochs * p.steps, 1)
                progress.update(
                    task, description=f"{handle.type or 'job'} {handle.id[:8]}", total=total,
                    completed=(p.epoch - 1) * p.steps + p.step if p.epoch >= 1 else p.step,
                    epoch=f"{p.epoch}/{p.epochs}", step=f"{p.step}/{p.steps}",
                    loss="-" if p.loss is None else f"{p.loss:.4f}",
                    rate="" if p.items_per_s is None else f"{p.items_per_s:,.0f} items/s",
                    eta=_duration(p.eta_s),
                )  # fmt: skip
            elif status.state == "STARTED":
                progress.update(task, description=f"{handle.type or 'job'} {handle.id[:8]}: started")
            time.sleep(0.5)


class _Live:
    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def __enter__(self) -> Progress:
        self.progress.start()
        return self.progress

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.progress.stop()
