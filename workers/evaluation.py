"""evaluate jobs: one model version measured on a labelled file, the metrics recorded in that
version's ``conveyor.json`` (``evaluations``, keyed by the file's SHA-256 and the evaluation).

What "evaluate" means is the serving kind's: each job kind names an ``Evaluation`` class in its
``KindSpec.evaluation`` (classify and sentiment: accuracy and macro-F1; transcribe: WER;
recommend: recall@k and NDCG@k). ``evaluation_for`` picks it from the registry: the job's
``evaluate_as``, else the version's metadata ``task``, else the first kind whose
``model_kinds`` lists the version's kind. The compress job uses the same classes to compare a
compressed version with its parent.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Final, Protocol

from shared import kinds
from shared.errors import InvalidJob
from shared.input_paths import resolve_input
from shared.kinds.compress import EvaluationFields
from shared.kinds.evaluate import EvaluateJob
from shared.kinds.spec import KindSpec
from shared.model_store import EVALUATIONS_KEY, RESULT_KEY, ModelStore, ModelVersion
from shared.results import Progress
from shared.settings import Settings
from workers.model_cache import ModelCache
from workers.training.loop import ProgressFn, StopFn, TrainingOutcome

MAX_EVALUATIONS: Final = 50  # kept per version (the oldest dropped beyond)


@dataclass(frozen=True)
class Labelled:
    """The rows of an evaluation file: inputs, the expected answers, and the file's identity."""

    inputs: list[Any]
    labels: list[Any]
    sha256: str
    columns: tuple[str, str]
    classes: tuple[str, ...] = ()  # classifiers: every label in the file (zero-shot's label set)
    extra: dict[str, Any] = field(default_factory=dict)  # what an evaluation needs besides (e.g. k)

    def rows(self, start: int, stop: int) -> Labelled:
        return replace(self, inputs=self.inputs[start:stop], labels=self.labels[start:stop])

    def __len__(self) -> int:
        return len(self.inputs)


class Evaluation(Protocol):
    """One serving kind's evaluation, built with ``(store, cache, device)``."""

    default_columns: ClassVar[tuple[str, str]]  # (inputs, expected answers)
    # None when int8 dynamic quantization applies to this kind's models; else why it does not.
    int8_refusal: ClassVar[str | None]
    batch_sizes: ClassVar[tuple[int, ...]]  # the batch sizes a latency measurement tries
    chunk_rows: ClassVar[int]  # rows per prediction call: what one call may hold in memory

    def read(self, path: Path, input_column: str, label_column: str, max_rows: int, job: EvaluationFields) -> Labelled:
        """The file's rows, checked (InvalidJob naming what is wrong)."""
        ...

    def predict(self, version: ModelVersion, data: Labelled) -> list[Any]:
        """One prediction per row, served as the kind's runner serves it (quantized where the
        version says so)."""
        ...

    def metrics(self, data: Labelled, predictions: Sequence[Any]) -> dict[str, float]: ...

    def agreement(self, a: Sequence[Any], b: Sequence[Any]) -> float:
        """The fraction of rows on which two versions give the same answer (top label, transcript, top item)."""
        ...

    def module(self, version: ModelVersion) -> Any:
        """The fp32 torch module whose Linear layers int8 quantizes (for sizes and the check that it applies)."""
        ...


def evaluation_for(version: ModelVersion, evaluate_as: str | None = None) -> KindSpec:
    """The job kind whose evaluation applies to ``version`` (InvalidJob when none does)."""
    if evaluate_as is not None:
        try:
            spec = kinds.get(evaluate_as)
        except kinds.UnknownKind as exc:
            raise InvalidJob(str(exc)) from None
        if spec.evaluation is None:
            with_one = ", ".join(n for n, s in kinds.KINDS.items() if s.evaluation)
            raise InvalidJob(f"{evaluate_as} jobs define no evaluation; these do: {with_one}")
        return spec
    task = version.metadata.get("task")
    if isinstance(task, str) and task in kinds.KINDS and kinds.KINDS[task].evaluation is not None:
        return kinds.KINDS[task]
    for spec in kinds.KINDS.values():
        if spec.evaluation is not None and version.kind in spec.model_kinds:
            return spec
    raise InvalidJob(f"no evaluation applies to {version.ref} (model kind {version.kind!r}); name one with evaluate_as")


def build_evaluation(spec: KindSpec, store: ModelStore, device: str) -> Evaluation:
    assert spec.evaluation is not None
    cls = kinds.import_path(spec.evaluation)
    evaluation: Evaluation = cls(store, ModelCache(8 << 30), device)
    return evaluation


def read_data(evaluation: Evaluation, path: str, job: EvaluationFields, field: str) -> Labelled:
    real = resolve_input(path, Settings(), field)
    inputs, labels = evaluation.default_columns
    return evaluation.read(real, job.input_column or inputs, job.label_column or labels, job.max_rows, job)


def predict_all(
    evaluation: Evaluation,
    version: ModelVersion,
    data: Labelled,
    tick: Callable[[int], None],
) -> list[Any]:
    """Predictions for every row, the evaluation's ``chunk_rows`` a call; ``tick(rows done)``
    between calls (progress, and cancellation: it raises JobCancelled)."""
    out: list[Any] = []
    step = type(evaluation).chunk_rows
    for start in range(0, len(data), step):
        tick(start)
        out.extend(evaluation.predict(version, data.rows(start, start + step)))
    tick(len(data))
    return out


def evaluation_record(
    spec: KindSpec, data: Labelled, metrics: dict[str, float], path: str, job_id: str
) -> dict[str, Any]:
    return {
        "kind": spec.name,
        "data_sha256": data.sha256,
        "data_path": path,
        "columns": list(data.columns),
        "rows": len(data),
        "metrics": metrics,
        "job_id": job_id,
        "at": time.time(),
        **({"k": data.extra["k"]} if "k" in data.extra else {}),
    }


def record_evaluation(store: ModelStore, version: ModelVersion, record: dict[str, Any]) -> ModelVersion:
    """Add ``record`` to the version's evaluations (replacing one of the same file, kind and columns)."""

    def change(meta: dict[str, Any]) -> None:
        same = ("kind", "data_sha256", "columns", "k")
        kept = [
            e
            for e in meta.get(EVALUATIONS_KEY, [])
            if isinstance(e, dict) and any(e.get(key) != record.get(key) for key in same)
        ]
        meta[EVALUATIONS_KEY] = [*kept, record][-MAX_EVALUATIONS:]

    return store.update_metadata(version.ref, change)


class Ticker:
    """Progress (rows as steps) at most every 2 s, and cancellation at every call."""

    def __init__(self, progress: ProgressFn, should_stop: StopFn, rows: int, phases: int = 1) -> None:
        self.progress, self.should_stop, self.rows, self.phases = progress, should_stop, rows, phases
        self.phase = 1
        self._last = 0.0
        self._started = time.monotonic()

    def __call__(self, done: int) -> None:
        from shared.errors import JobCancelled

        if self.should_stop():
            raise JobCancelled("cancelled; nothing was recorded")
        now = time.monotonic()
        if now - self._last >= 2.0 or done == self.rows:
            self._last = now
            rate = done / max(now - self._started, 1e-9)
            self.progress(
                Progress(epoch=self.phase, epochs=self.phases, step=done, steps=self.rows, items_per_s=rate or None)
            )

    def next_phase(self) -> None:
        self.phase += 1
        self._started = time.monotonic()


def evaluate(
    job: EvaluateJob,
    store: ModelStore,
    checkpoint_dir: Path,
    progress: ProgressFn,
    should_stop: StopFn,
    device: str = "cpu",
) -> TrainingOutcome:
    """The training worker's entry for evaluate jobs (a ``Trainer``: nothing to checkpoint)."""
    version = store.resolve(job.model)  # an alias or @latest is pinned here, for the whole job
    spec = evaluation_for(version, job.evaluate_as)
    evaluation = build_evaluation(spec, store, device)
    data = read_data(evaluation, job.data_path, job, "data_path")
    ticker = Ticker(progress, should_stop, len(data))
    predictions = predict_all(evaluation, version, data, ticker)
    metrics = evaluation.metrics(data, predictions)
    record = evaluation_record(spec, data, metrics, job.data_path, job.id)
    if version.version is not None:
        record_evaluation(store, version, record)
    else:  # a built-in or a plain directory: no conveyor.json of Conveyor's to record it in
        record["recorded"] = False
    # The evaluated version's own record (its training job's result) must not stand for this
    # job's: the outcome's version carries no RESULT_KEY, so the training path reports ``metrics``.
    shown = ModelVersion(
        version.name, version.version, version.path, {k: v for k, v in version.metadata.items() if k != RESULT_KEY}
    )
    return TrainingOutcome(
        version=shown, metrics=metrics, epochs_run=0, resumed_from_epoch=0, extra={"evaluation": record}
    )
