"""The plug-in point between the runtime and a model: one ``JobKind`` per inference job type.

A kind turns validated jobs into batcher items (``prepare``: resolve and pin the model,
tokenize, decode audio) and a job's item outputs back into its result body (``finish``). It
knows nothing of Celery or Redis; the runtime owns deadlines, batchers and ``JobMeta``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from shared.errors import InvalidJob
from shared.jobs import JobBase
from shared.model_store import ModelStore
from workers.batcher import Batcher, BatchPolicy


@dataclass(slots=True)
class Prepared:
    """A job made ready for its batcher: its items, the model that serves it (pinned), and
    whatever ``finish`` needs besides the outputs."""

    items: list[Any]
    model: str
    context: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


class JobKind(Protocol):
    job_type: str
    # True when ``prepare`` does slow I/O (audio decoding): the runtime runs it off the ingest thread.
    slow_prepare: bool

    def build_batcher(self, policy: BatchPolicy) -> Batcher[Any, Any]: ...

    def prepare(self, jobs: Sequence[JobBase]) -> list[Prepared | BaseException]:
        """One entry per job, in order: its items, or the error that fails that job alone."""
        ...

    def finish(self, job: JobBase, prepared: Prepared, outputs: list[Any]) -> dict[str, Any]:
        """The job's result body (without ``job_id``, ``type`` and ``meta``) from its items' outputs."""
        ...


class PinnedModels:
    """Model names resolved once per bulk of jobs (a store lookup reads the disk), each pinned
    to one version (``@latest`` included) for every job that names it; a bad name is its error."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self._seen: dict[str, str | BaseException] = {}

    def pin(self, ref: str) -> str | BaseException:
        if ref not in self._seen:
            try:
                self._seen[ref] = self.store.resolve(ref).ref
            except (InvalidJob, LookupError) as exc:
                self._seen[ref] = exc
        return self._seen[ref]
