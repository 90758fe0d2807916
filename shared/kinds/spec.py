"""What a job kind declares, once: ``KindSpec``. Everything else (queue and task names, the job
union, result models, the worker's dispatch, Celery's tasks, `conveyor submit`, `conveyor
score`, `conveyor schema`, metrics labels, the demo) reads it from the registry
(``shared.kinds``). pydantic and the standard library only: producers import it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, Literal

from pydantic import BaseModel

from shared.jobs import JobBase

Mode = Literal["inference", "training"]

QUEUE_PREFIX: Final = "conveyor."
BULK_QUEUE_PREFIX: Final = "conveyor.bulk."
# Long jobs share one queue, consumed one job at a time per device.
TRAINING_QUEUE: Final = "conveyor.training"


@dataclass(frozen=True)
class CliOption:
    """How `conveyor submit KIND` reads one job field, where the schema alone does not say it."""

    flag: str | None = None  # e.g. "--text" for ``texts`` (repeatable); default: --field-name
    file: Literal["base64", "path"] | None = None  # the option names a local file: sent inline, or as its path
    # With ``file``: each file is sent as ``{key: value}`` (a list field takes the option repeated).
    key: str | None = None
    split: bool = False  # a comma-separated list in one option


@dataclass(frozen=True)
class ScoreColumn:
    """One output column of `conveyor score NAME`: ``key`` of each item's entry in the result's
    ``results`` list (one entry per item, in order)."""

    name: str
    key: str
    type: Literal["string", "float", "int", "json"] = "json"  # json: the value as a JSON string


@dataclass(frozen=True)
class KindSpec:
    """One job kind. ``runner`` is an import path (``module:attribute``), so producers never
    import torch: for an inference kind a ``workers.kinds.JobKind`` class built with
    ``(store, cache, device)``; for a training kind a ``workers.training.loop.Trainer``."""

    name: str  # the job's "type" on the wire
    job: type[JobBase]
    result: type[BaseModel]
    mode: Mode
    runner: str
    summary: str  # one line: `conveyor submit` help, the README's list
    # The job's list field whose entries are batch items (prefetch counts them); None: one item.
    items: str | None = None
    # Bulk scoring (`conveyor score NAME`): the columns each row gets, read from the item's entry
    # in the result (the generic adapter: rows are the ``items`` field's entries, the other job
    # fields are the command's options); or, for a kind that needs more, an import path of a
    # producers.score.kinds.Scoring class.
    score_columns: tuple[ScoreColumn, ...] = ()
    score_row: str | None = None  # a row's value becomes {score_row: value} in ``items`` (None: the value)
    scoring: str | None = None
    # `conveyor submit NAME`: fields the command leaves out (set by the command itself, or none).
    cli: dict[str, CliOption] = field(default_factory=dict)
    cli_skip: tuple[str, ...] = ()
    # A small valid job of this kind (its fields): docs and the registry's tests use it.
    example: dict[str, Any] = field(default_factory=dict)
    # `conveyor demo`: the fields of a job that shows the kind at work (None: the demo has its own).
    demo: dict[str, Any] | None = None
    # Names fixed before the registry existed (kept byte for byte on the wire).
    task_name: str | None = None
    queue_name: str | None = None
    order: int = 100  # where it is listed (and served, at equal priority); then by name
    # `conveyor models evaluate` and `compress --eval`: what evaluating a model this kind serves
    # means, as an import path of a ``workers.evaluation.Evaluation`` class (None: not evaluated).
    evaluation: str | None = None
    # The store's model kinds (a version's metadata ``kind``) this job kind serves: a model is
    # evaluated by the first kind that lists its kind, unless its metadata names a ``task``.
    model_kinds: tuple[str, ...] = ()

    @property
    def task(self) -> str:
        """The Celery task name."""
        return self.task_name or QUEUE_PREFIX + self.name.replace("-", "_")

    @property
    def queue(self) -> str:
        if self.queue_name:
            return self.queue_name
        return TRAINING_QUEUE if self.mode == "training" else QUEUE_PREFIX + self.name

    @property
    def bulk_queue(self) -> str | None:
        """Where `conveyor score` sends its chunks: only kinds with bulk scoring have one."""
        return BULK_QUEUE_PREFIX + self.name if self.scorable else None

    @property
    def scorable(self) -> bool:
        return self.scoring is not None or bool(self.score_columns)

    @property
    def inference(self) -> bool:
        return self.mode == "inference"
