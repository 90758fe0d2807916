"""A bulk run's state beside its output, ``OUT.conveyor-score/``: what makes it resumable.

- ``manifest.json``: the input's checksum, the job type, the options and the chunk size. A
  second run with the same output resumes only if all of them match.
- ``journal.jsonl``: append-only, flushed and fsync'd per line. ``{"sent": i, "job": id}``
  is written before chunk i is published; ``{"done": i, "cols": {...}}`` once its result
  columns are safe on disk. A line torn by a kill is dropped when the journal is reopened.

Chunk i is rows [i * chunk_size, (i + 1) * chunk_size) of the input; its job id is
``score-RUN-i``, the same in every session of the run, so a resumed run can find the result
of a chunk that finished while no CLI was watching (``score-RUN-i-rN`` if Redis lost it and
it was sent again).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final

from pydantic import BaseModel, Field

STATE_SUFFIX: Final = ".conveyor-score"
MANIFEST: Final = "manifest.json"
JOURNAL: Final = "journal.jsonl"
JOB_ID_PREFIX: Final = "score-"


class ResumeRefused(ValueError):
    """The state beside the output belongs to a different input or different options."""


class Manifest(BaseModel):
    format_version: int = 1
    run_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:16])
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    job_type: str
    input_path: str
    input_sha256: str
    input_bytes: int
    rows: int
    column: str
    chunk_size: int
    options: dict[str, Any]
    output_columns: list[str]

    @property
    def job_prefix(self) -> str:
        return f"{JOB_ID_PREFIX}{self.run_id}-"

    def job_id(self, chunk: int, attempt: int = 0) -> str:
        """A resend (of a chunk Redis lost) gets a new id: an explicit job id is accepted once."""
        return f"{self.job_prefix}{chunk:07d}" + (f"-r{attempt}" if attempt else "")

    @property
    def chunks(self) -> int:
        return -(-self.rows // self.chunk_size)

    def chunk_rows(self, chunk: int) -> int:
        return min(self.chunk_size, self.rows - chunk * self.chunk_size)


def state_dir_for(out: Path) -> Path:
    return out.with_name(out.name + STATE_SUFFIX)


def _differences(old: Manifest, new: Manifest) -> list[str]:
    diffs = []
    for name in ("job_type", "column", "chunk_size", "output_columns"):
        if getattr(old, name) != getattr(new, name):
            diffs.append(f"{name} was {getattr(old, name)!r}, now {getattr(new, name)!r}")
    for key in sorted(set(old.options) | set(new.options)):
        if old.options.get(key) != new.options.get(key):
            diffs.append(f"{key} was {old.options.get(key)!r}, now {new.options.get(key)!r}")
    return diffs


@dataclass
class DoneChunk:
    offset: int  # of its line in the journal
    errors: int
    rows: int


@dataclass
class RunState:
    dir: Path
    manifest: Manifest
    resumed: bool
    done: dict[int, DoneChunk] = field(default_factory=dict)
    sent: dict[int, int] = field(default_factory=dict)  # chunk -> times published
    _journal: IO[bytes] | None = None

    @classmethod
    def open(cls, out: Path, fresh: Manifest) -> RunState:
        """Resume the run beside ``out`` if it matches ``fresh``; start one if there is none."""
        directory = state_dir_for(out)
        manifest_path = directory / MANIFEST
        if manifest_path.exists():
            old = Manifest.model_validate_json(manifest_path.read_text())
            if old.input_sha256 != fresh.input_sha256 or old.input_bytes != fresh.input_bytes:
                raise ResumeRefused(
                    f"{fresh.input_path} changed since the interrupted run in {directory} began "
                    f"(sha256 {old.input_sha256[:12]}..., now {fresh.input_sha256[:12]}...): restore the "
                    f"file, or delete {directory} to start over"
                )
            diffs = _differences(old, fresh)
            if diffs:
                raise ResumeRefused(
                    f"the interrupted run in {directory} used other options ({'; '.join(diffs)}): run it "
                    f"with the same options, or delete {directory} to start over"
                )
            state = cls(directory, old, resumed=True)
            state._load_journal()
        else:
            directory.mkdir(parents=True, exist_ok=True)
            _write_durably(manifest_path, fresh.model_dump_json(indent=2).encode())
            state = cls(directory, fresh, resumed=False)
        state._journal = open(directory / JOURNAL, "ab")  # noqa: SIM115 (appended to until close())
        return state

    def _load_journal(self) -> None:
        path = self.dir / JOURNAL
        if not path.exists():
            return
        good_end = 0
        with open(path, "rb") as f:
            offset = 0
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    break  # torn by a kill mid-write: everything after it is dropped
                if not line.endswith(b"\n"):
                    break
                if "done" in entry:
                    self.done[entry["done"]] = DoneChunk(offset, entry["errors"], entry["rows"])
                elif "sent" in entry:
                    self.sent[entry["sent"]] = self.sent.get(entry["sent"], 0) + 1
                offset += len(line)
                good_end = offset
        if good_end != path.stat().st_size:
            with open(path, "r+b") as f:
                f.truncate(good_end)

    # -- recording ------------------------------------------------------------------------
    def _append(self, entry: dict[str, Any]) -> int:
        assert self._journal is not None
        offset = self._journal.tell()
        self._journal.write(json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())
        return offset

    def current_job_id(self, chunk: int) -> str:
        """The id of the chunk's latest send."""
        return self.manifest.job_id(chunk, max(self.sent.get(chunk, 1) - 1, 0))

    def record_sent(self, chunk: int) -> str:
        """Journal the chunk's next send; returns the job id to publish it under."""
        job_id = self.manifest.job_id(chunk, self.sent.get(chunk, 0))
        self._append({"sent": chunk, "job": job_id})
        self.sent[chunk] = self.sent.get(chunk, 0) + 1
        return job_id

    def record_done(self, chunk: int, columns: dict[str, list[Any]], errors: int) -> None:
        rows = self.manifest.chunk_rows(chunk)
        offset = self._append({"done": chunk, "rows": rows, "errors": errors, "cols": columns})
        self.done[chunk] = DoneChunk(offset, errors, rows)

    # -- reading back ---------------------------------------------------------------------
    @property
    def rows_done(self) -> int:
        return sum(d.rows for d in self.done.values())

    @property
    def errors(self) -> int:
        return sum(d.errors for d in self.done.values())

    def read_chunk(self, chunk: int) -> dict[str, list[Any]]:
        with open(self.dir / JOURNAL, "rb") as f:
            f.seek(self.done[chunk].offset)
            columns: dict[str, list[Any]] = json.loads(f.readline())["cols"]
        return columns

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
