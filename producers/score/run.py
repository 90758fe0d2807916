"""One bulk run: check everything that can fail before a chunk is queued, send chunks with a
bound on how many are in flight, record each finished chunk durably, and write the output in
input order at the end.

Memory stays flat: the input is read as a stream (only the scored column while scoring),
only the chunks in flight are held, and the output is assembled by streaming the input
again beside the journal.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import pyarrow as pa
import redis
from kombu.exceptions import OperationalError

from producers.score.broker import ChunkBroker, ChunkOutcome
from producers.score.kinds import ERROR_COLUMN, Scoring
from producers.score.state import JOURNAL, Manifest, RunState, state_dir_for
from producers.tabular import TableReader, TabularError, TextOptions, file_format, file_sha256, open_writer
from shared.errors import ConveyorError, ModelNotFound, QueueFull
from shared.model_store import ModelStore

if TYPE_CHECKING:
    from producers.client import Client

T = TypeVar("T")

LOST_CHECK_S: Final = 30.0  # a chunk in flight this long is looked for in the queue
RECONNECT_S: Final = 120.0  # how long Redis may be unreachable before the run gives up
ASSEMBLY_ROWS: Final = 8192  # rows per output batch while the output is written
ABORTING_ERRORS: Final = ("ModelNotFound",)  # every chunk would fail the same way


class ScoreAborted(ConveyorError):
    """The run cannot go on (or cannot start); the message says why. Its state is kept."""


class ScoreInterrupted(ConveyorError):
    """Stopped on request; running the same command again resumes."""


@dataclass(frozen=True)
class ScoreRequest:
    input: Path
    out: Path
    column: str
    keep: list[str] | None = None  # input columns to copy to the output; None: all
    text_options: TextOptions = field(default_factory=TextOptions)
    chunk_size: int | None = None  # None: from the job type and the workers' batch size
    in_flight: int | None = None
    overwrite: bool = False
    check_model: bool = True  # look the model up in the local store when there is one


@dataclass(frozen=True)
class ScoreProgress:
    total: int
    done: int
    errors: int
    resumed: int  # rows already done when this session began
    elapsed_s: float
    phase: str  # "scoring", "writing", "done"

    @property
    def rows_per_s(self) -> float:
        return (self.done - self.resumed) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        rate = self.rows_per_s
        return (self.total - self.done) / rate if rate > 0 else None


@dataclass(frozen=True)
class ScoreSummary:
    out: Path
    rows: int
    errors: int
    resumed: int
    elapsed_s: float
    chunks_sent: int  # published by this session (a resumed run does not resend finished chunks)
    chunks_adopted: int  # found queued, running or finished from an earlier session

    @property
    def rows_per_s(self) -> float:
        return (self.rows - self.resumed) / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class _Flight:
    chunk: int
    valid: list[int]  # positions in the chunk of the rows in the job
    errors: list[str]  # per row: "" or why the row was kept out
    sent_at: float
    suspect: bool = False  # missing from Redis at the last look


class ScoreRun:
    def __init__(self, client: Client, kind: Scoring, request: ScoreRequest) -> None:
        self.client = client
        self.kind = kind
        self.request = request
        self.settings = client.settings
        self.state: RunState | None = None
        self.sent = 0
        self.adopted = 0

    # -- before anything is queued ------------------------------------------------------------
    def prepare(self) -> RunState:
        """Open the input, check the column, the output and the model, and open (or resume) the state."""
        req = self.request
        try:
            out_format = file_format(req.out)
            self.reader = TableReader(req.input, req.text_options)
            names = list(self.reader.schema.names)
        except TabularError as exc:
            raise ScoreAborted(str(exc)) from None
        self.out_format = out_format
        if req.column not in names:
            raise ScoreAborted(f"{req.input}: no column {req.column!r}; its columns are {', '.join(names)}")
        self.keep = names if req.keep is None else list(req.keep)
        missing = [c for c in self.keep if c not in names]
        if missing:
            raise ScoreAborted(
                f"{req.input}: no column {', '.join(map(repr, missing))} to keep; its columns are {', '.join(names)}"
            )
        added = [f.name for f in self.kind.result_fields] + [ERROR_COLUMN]
        clash = [c for c in self.keep if c in added]
        if clash:
            raise ScoreAborted(
                f"{req.input} already has column {', '.join(map(repr, clash))}, which the output adds; "
                f"leave it out with --keep (keep= from Python), or rename it"
            )
        self._check_model()
        state_dir = state_dir_for(req.out)
        if req.out.exists() and not state_dir.exists() and not req.overwrite:
            raise ScoreAborted(f"{req.out} exists; pass --overwrite (overwrite=True) to replace it")
        try:
            rows = self.reader.count_rows(req.column)
        except TabularError as exc:
            raise ScoreAborted(str(exc)) from None
        chunk_size = req.chunk_size or self.kind.chunk_size(self.settings)
        manifest = Manifest(
            job_type=self.kind.job_type,
            input_path=str(req.input.resolve()),
            input_sha256=file_sha256(req.input),
            input_bytes=req.input.stat().st_size,
            rows=rows,
            column=req.column,
            chunk_size=chunk_size,
            options=self.kind.options(),
            output_columns=self.keep + added,
        )
        self.state = RunState.open(req.out, manifest)
        return self.state

    def _check_model(self) -> None:
        """A model the store lacks fails here. The store is only visible when the workers share
        this machine's (CONVEYOR_MODEL_DIR); elsewhere the first chunk is sent alone and its
        failure stops the run before any other is queued."""
        ref = self.kind.model_ref()
        root = self.settings.models_path
        if ref is None or not self.request.check_model or not root.is_dir():
            return
        try:
            ModelStore(root).resolve(ref)
        except ModelNotFound as exc:
            raise ScoreAborted(f"{exc} (looked in {root}; the workers must use the same store)") from None

    # -- scoring --------------------------------------------------------------------------------
    def run(
        self,
        on_progress: Callable[[ScoreProgress], None] | None = None,
        stop: threading.Event | None = None,
    ) -> ScoreSummary:
        state = self.state or self.prepare()
        self._on_progress = on_progress or (lambda p: None)
        self._stop = stop or threading.Event()
        self._started = time.monotonic()
        self._resumed_rows = state.rows_done
        self.broker = ChunkBroker(self.client, self.kind.job_type)
        m = state.manifest
        try:
            self._report("scoring")
            max_in_flight = max(1, self.request.in_flight or self.kind.in_flight(self.settings))
            adoptable = self._adoptable()
            probe = not state.done  # the run's first chunk goes alone: a bad model stops it at once
            inflight: dict[str, _Flight] = {}
            for chunk, values in self._chunks():
                if chunk in state.done:
                    continue
                flight = self._flight(chunk, values)
                if flight is None:
                    continue
                if state.current_job_id(chunk) in adoptable:
                    job_id = state.current_job_id(chunk)
                    self.adopted += 1
                else:
                    job_id = self._publish(flight, [values[p] for p in flight.valid])
                inflight[job_id] = flight
                if probe:
                    while inflight:
                        self._collect(inflight)
                    probe = False
                while len(inflight) >= max_in_flight:
                    self._collect(inflight)
            while inflight:
                self._collect(inflight)
            self._report("writing")
            self._assemble()
            self._report("done")
            return ScoreSummary(
                self.request.out, m.rows, state.errors, self._resumed_rows, time.monotonic() - self._started,
                self.sent, self.adopted,
            )  # fmt: skip
        finally:
            state.close()

    def _adoptable(self) -> set[str]:
        """Chunks an earlier session sent that are queued, running or finished: waited for, not resent."""
        state = self.state
        assert state is not None
        unfinished = [state.current_job_id(c) for c in state.sent if c not in state.done]
        if not unfinished:
            return set()
        waiting = self._redis(lambda: self.broker.waiting(state.manifest.job_prefix))  # before results: no gap
        finished = {o.job_id for o in self._redis(lambda: self.broker.poll(unfinished))}
        return (waiting | finished) & set(unfinished)

    def _chunks(self) -> Iterator[tuple[int, list[Any]]]:
        size = self.state.manifest.chunk_size  # type: ignore[union-attr]
        pending: list[Any] = []
        chunk = 0
        for batch in self.reader.batches([self.request.column]):
            values = batch.column(0).to_pylist()
            at = 0
            while at < len(values):
                take = min(size - len(pending), len(values) - at)
                pending.extend(values[at : at + take])
                at += take
                if len(pending) == size:
                    yield chunk, pending
                    pending, chunk = [], chunk + 1
        if pending:
            yield chunk, pending

    def _flight(self, chunk: int, values: list[Any]) -> _Flight | None:
        """Check each row; a chunk with no valid row is done at once."""
        errors = [""] * len(values)
        valid = []
        for pos, value in enumerate(values):
            checked, error = self.kind.check(value)
            if error is None:
                values[pos] = checked
                valid.append(pos)
            else:
                errors[pos] = error
        if not valid:
            self._record(_Flight(chunk, valid, errors, 0.0), None)
            return None
        return _Flight(chunk, valid, errors, time.monotonic())

    def _publish(self, flight: _Flight, values: list[str]) -> str:
        assert self.state is not None
        job_id = self.state.record_sent(flight.chunk)  # before publishing: a kill in between resends, never loses
        job = self.kind.job(job_id, values)
        while True:
            try:
                self._redis(lambda: self.broker.publish(job))
                break
            except QueueFull:  # CONVEYOR_MAX_QUEUE_DEPTH: wait for the workers to catch up
                if self._stop.is_set():
                    raise ScoreInterrupted("stopped; run the same command again to resume") from None
                time.sleep(0.5)
        flight.sent_at = time.monotonic()
        self.sent += 1
        return job_id

    def _collect(self, inflight: dict[str, _Flight]) -> None:
        """Wait for at least one chunk in flight to finish, and record what finished."""
        delay = 0.01
        while True:
            if self._stop.is_set():
                raise ScoreInterrupted("stopped; run the same command again to resume")
            outcomes = self._redis(lambda: self.broker.poll(list(inflight)))
            if outcomes:
                break
            self._look_for_lost(inflight)
            time.sleep(delay)
            delay = min(delay * 1.5, 0.1)
        for outcome in outcomes:
            flight = inflight.pop(outcome.job_id)
            if not outcome.ok and outcome.error_type in ABORTING_ERRORS:
                raise ScoreAborted(f"chunk {flight.chunk} failed: {outcome.error_type}: {outcome.error}")
            self._record(flight, outcome)
        self._redis(lambda: self.broker.forget([o.job_id for o in outcomes]))
        self._report("scoring")

    def _record(self, flight: _Flight, outcome: ChunkOutcome | None) -> None:
        assert self.state is not None
        n = len(flight.errors)
        columns: dict[str, list[Any]] = {f.name: [None] * n for f in self.kind.result_fields}
        errors = list(flight.errors)
        if outcome is not None and outcome.ok:
            try:
                parsed = self.kind.columns(outcome.result or {}, len(flight.valid))
                for name, values in parsed.items():
                    for pos, value in zip(flight.valid, values):
                        columns[name][pos] = value
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                outcome = ChunkOutcome(outcome.job_id, False, error_type="BadResult", error=str(exc))
        if outcome is not None and not outcome.ok:
            for pos in flight.valid:
                errors[pos] = f"{outcome.error_type}: {outcome.error}"
        columns[ERROR_COLUMN] = errors
        self.state.record_done(flight.chunk, columns, sum(1 for e in errors if e))

    def _look_for_lost(self, inflight: dict[str, _Flight]) -> None:
        """Resend a chunk that Redis no longer holds (restarted without its data): missing from the
        queue, the workers' hands and the results at two looks in a row."""
        now = time.monotonic()
        old = {job_id: f for job_id, f in inflight.items() if now - f.sent_at > LOST_CHECK_S}
        if not old:
            return
        assert self.state is not None
        waiting = self._redis(lambda: self.broker.waiting(self.state.manifest.job_prefix))  # type: ignore[union-attr]
        finished = {o.job_id for o in self._redis(lambda: self.broker.poll(list(old)))}
        for job_id, flight in old.items():
            if job_id in waiting or job_id in finished:
                flight.suspect = False
                flight.sent_at = now
            elif flight.suspect:
                flight.suspect = False
                chunk_values = self._values_of(flight.chunk)
                del inflight[job_id]
                inflight[self._publish(flight, [chunk_values[p] for p in flight.valid])] = flight
            else:
                flight.suspect = True
                flight.sent_at = now - LOST_CHECK_S + 2.0  # look again in two seconds

    def _values_of(self, chunk: int) -> list[Any]:
        for index, values in self._chunks():
            if index == chunk:
                return [self.kind.check(v)[0] for v in values]
        raise ScoreAborted(f"chunk {chunk} is beyond the end of {self.request.input}")

    def _redis(self, call: Callable[[], T]) -> T:
        """Ride out a Redis restart: retry for up to RECONNECT_S."""
        deadline = time.monotonic() + RECONNECT_S
        while True:
            try:
                return call()
            except (redis.ConnectionError, redis.TimeoutError, OperationalError, ConnectionError) as exc:
                if time.monotonic() > deadline or self._stop.is_set():
                    raise ScoreAborted(f"Redis unreachable for {RECONNECT_S:.0f}s: {exc}") from None
                time.sleep(1.0)

    def _report(self, phase: str) -> None:
        assert self.state is not None
        self._on_progress(
            ScoreProgress(
                self.state.manifest.rows,
                self.state.rows_done,
                self.state.errors,
                self._resumed_rows,
                time.monotonic() - self._started,
                phase,
            )  # fmt: skip
        )

    # -- the output -----------------------------------------------------------------------------
    def _assemble(self) -> None:
        """Input rows in order, the kept columns beside the result columns, written to a file in
        the state directory and renamed into place."""
        state = self.state
        assert state is not None
        source = self.reader.schema
        fields = [source.field(c) for c in self.keep] + list(self.kind.result_fields)
        fields.append(pa.field(ERROR_COLUMN, pa.string()))
        schema = pa.schema(fields)
        tmp = state.dir / f"output{self.request.out.suffix}"
        writer = open_writer(tmp, schema, self.out_format)
        feed = _ResultFeed(state)
        # pyarrow reads every column for an empty selection: read the scored one for row counts instead.
        read = self.keep or [self.request.column]
        try:
            for block in self.reader.batches(read):
                # A narrow file's block holds ~100k rows: results become Python objects a slice at a time.
                for start in range(0, block.num_rows, ASSEMBLY_ROWS):
                    batch = block.slice(start, ASSEMBLY_ROWS)
                    results = feed.take(batch.num_rows)
                    arrays = [batch.column(i) for i in range(len(self.keep))]
                    arrays += [pa.array(results[f.name], type=f.type) for f in fields[len(self.keep) :]]
                    writer.write(pa.RecordBatch.from_arrays(arrays, schema=schema))
        finally:
            writer.close()
        if not feed.exhausted:
            raise ScoreAborted(f"{self.request.input} has fewer rows than when the run began")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.request.out)
        state.remove()


class _ResultFeed:
    """The journal's result rows in input order, a chunk at a time."""

    def __init__(self, state: RunState) -> None:
        self.state = state
        self.next_chunk = 0
        self.buffer: dict[str, deque[Any]] = {}
        self._journal = open(state.dir / JOURNAL, "rb")  # noqa: SIM115 (read chunk by chunk, closed when exhausted)

    def _load(self) -> bool:
        if self.next_chunk >= self.state.manifest.chunks:
            return False
        self._journal.seek(self.state.done[self.next_chunk].offset)
        columns: dict[str, list[Any]] = json.loads(self._journal.readline())["cols"]
        for name, values in columns.items():
            self.buffer.setdefault(name, deque()).extend(values)
        self.next_chunk += 1
        return True

    def take(self, n: int) -> dict[str, list[Any]]:
        while (not self.buffer or len(next(iter(self.buffer.values()))) < n) and self._load():
            pass
        available = len(next(iter(self.buffer.values()))) if self.buffer else 0
        if available < n:
            raise ScoreAborted("the input has more rows than when the run began")
        return {name: [values.popleft() for _ in range(n)] for name, values in self.buffer.items()}

    @property
    def exhausted(self) -> bool:
        done = self.next_chunk >= self.state.manifest.chunks and all(not v for v in self.buffer.values())
        if done:
            self._journal.close()
        return done


# -- a run in the background, for Client.score ------------------------------------------------------
@dataclass
class ScoreHandle:
    """A bulk run going on in a background thread: its progress, and its output when done."""

    run: ScoreRun
    out: Path
    progress: ScoreProgress | None = None
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _summary: ScoreSummary | None = None
    _error: BaseException | None = None

    def start(self) -> ScoreHandle:
        self._thread = threading.Thread(target=self._main, name="conveyor-score", daemon=True)
        self._thread.start()
        return self

    def _main(self) -> None:
        try:
            self._summary = self.run.run(self._progress, self._stop)
        except BaseException as exc:  # handed to the caller of wait()
            self._error = exc

    def _progress(self, progress: ScoreProgress) -> None:
        self.progress = progress

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> ScoreSummary:
        """The summary once the output is written; raises what stopped the run."""
        assert self._thread is not None
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"scoring into {self.out} is still running after {timeout}s")
        if self._error is not None:
            raise self._error
        assert self._summary is not None
        return self._summary

    def stop(self) -> None:
        """Stop sending; what finished is kept, and scoring the same file again resumes."""
        self._stop.set()
