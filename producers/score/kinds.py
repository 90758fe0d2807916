"""What each job type needs for bulk scoring: how a row's value is checked, how a chunk of
rows becomes one job, and how the job's result becomes the output's columns.

A row that would make its whole job invalid (a blank text, a text over the limit) is kept
out of the job and gets its error in its own row, so its chunk-mates are still scored.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final, Protocol

import pyarrow as pa
from pydantic import TypeAdapter, ValidationError

from shared import kinds
from shared.errors import describe_validation_error
from shared.jobs import (
    MAX_PATH_CHARS,
    MAX_TEXT_CHARS,
    MAX_TEXTS_PER_JOB,
    MAX_USERS_PER_JOB,
    ClassifyJob,
    JobBase,
    RecommendJob,
    TranscribeJob,
)
from shared.settings import Settings

BULK_PRIORITY: Final = 0  # below every interactive job (whose default is 5)
ERROR_COLUMN: Final = "error"
MAX_USER_CHARS: Final = 200  # RecommendJob.users items


class Scoring(Protocol):
    """The plug-in point per job type."""

    job_type: str
    result_fields: tuple[pa.Field, ...]  # the columns added to the output, before ``error``

    def options(self) -> dict[str, Any]:
        """What decides the results: a resumed run must have the same."""
        ...

    def model_ref(self) -> str | None:
        """The model the workers must find in their store, if any."""
        ...

    def chunk_size(self, settings: Settings) -> int: ...

    def in_flight(self, settings: Settings) -> int:
        """Chunks queued or running at once: enough to keep the workers' batches full."""
        ...

    def check(self, value: Any) -> tuple[str | None, str | None]:
        """(the value as the job takes it, None) or (None, why this row cannot be scored)."""
        ...

    def job(self, job_id: str, values: list[str]) -> JobBase: ...

    def columns(self, result: dict[str, Any], count: int) -> dict[str, list[Any]]:
        """The result columns for the job's ``count`` rows, in the job's order."""
        ...


def _bulk(job_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": job_id, "priority": BULK_PRIORITY, "submitted_at": datetime.now(UTC), **fields}


def _text_value(value: Any, what: str) -> tuple[str | None, str | None]:
    if value is None:
        return None, f"{what} is missing"
    text = value if isinstance(value, str) else str(value)
    if not text.strip():
        return None, f"{what} is blank"
    return text, None


class ClassifyScoring:
    job_type = "classify"
    result_fields = (
        pa.field("label", pa.string()),
        pa.field("score", pa.float64()),
        pa.field("ranking", pa.string()),  # [{"label", "score"}, ...] as JSON, best first
    )

    def __init__(
        self,
        labels: list[str] | None = None,
        model: str | None = None,
        top_k: int | None = None,
        label_template: str | None = None,
    ) -> None:
        fields: dict[str, Any] = {"labels": labels, "model": model, "top_k": top_k}
        if label_template is not None:
            fields["label_template"] = label_template
        # Validate the options once, with a probe text, so a bad option fails before anything runs.
        self._template = ClassifyJob(texts=["probe"], **fields)
        self.labels, self.model, self.top_k = self._template.labels, self._template.model, self._template.top_k
        self.label_template = self._template.label_template

    def options(self) -> dict[str, Any]:
        return {"labels": self.labels, "model": self.model, "top_k": self.top_k, "label_template": self.label_template}

    def model_ref(self) -> str | None:
        return self.model  # zero-shot uses the built-in embedder

    def chunk_size(self, settings: Settings) -> int:
        # A few batches per message: the worker's batcher stays full while a chunk's result travels.
        return min(MAX_TEXTS_PER_JOB, 4 * settings.max_batch_size)

    def in_flight(self, settings: Settings) -> int:
        return 4

    def check(self, value: Any) -> tuple[str | None, str | None]:
        text, error = _text_value(value, "text")
        if text is not None and len(text) > MAX_TEXT_CHARS:
            return None, f"text has {len(text)} characters, over the limit of {MAX_TEXT_CHARS}"
        return text, error

    def job(self, job_id: str, values: list[str]) -> JobBase:
        return self._template.model_copy(update=_bulk(job_id, texts=values))

    def columns(self, result: dict[str, Any], count: int) -> dict[str, list[Any]]:
        rows = result["results"]
        if len(rows) != count:
            raise ValueError(f"classify result has {len(rows)} rows for {count} texts")
        rankings = [[{"label": s["label"], "score": s["score"]} for s in row["labels"]] for row in rows]
        return {
            "label": [r[0]["label"] for r in rankings],
            "score": [r[0]["score"] for r in rankings],
            "ranking": [json.dumps(r, ensure_ascii=False) for r in rankings],
        }


class TranscribeScoring:
    """One row (an audio path the workers can read) is one job: its failure is its row's error."""

    job_type = "transcribe"
    result_fields = (pa.field("text", pa.string()),)

    def __init__(self, model: str = "whisper-tiny.en", language: str | None = None, beam_size: int = 1) -> None:
        self._template = TranscribeJob(audio_path="probe", model=model, language=language, beam_size=beam_size)
        self.model, self.language, self.beam_size = model, language, beam_size

    def options(self) -> dict[str, Any]:
        return {"model": self.model, "language": self.language, "beam_size": self.beam_size}

    def model_ref(self) -> str | None:
        return self.model

    def chunk_size(self, settings: Settings) -> int:
        return 1

    def in_flight(self, settings: Settings) -> int:
        return settings.max_batch_size  # windows from many files share a generate call

    def check(self, value: Any) -> tuple[str | None, str | None]:
        path, error = _text_value(value, "audio path")
        if path is not None and len(path) > MAX_PATH_CHARS:
            return None, f"audio path has {len(path)} characters, over the limit of {MAX_PATH_CHARS}"
        return path, error

    def job(self, job_id: str, values: list[str]) -> JobBase:
        (path,) = values
        return self._template.model_copy(update=_bulk(job_id, audio_path=path))

    def columns(self, result: dict[str, Any], count: int) -> dict[str, list[Any]]:
        return {"text": [result["text"]]}


class RecommendScoring:
    """Users unknown to the model get popular items (flagged in ``fallback``), as interactive jobs do."""

    job_type = "recommend"
    result_fields = (
        pa.field("items", pa.string()),  # [{"item", "score"}, ...] as JSON, best first
        pa.field("fallback", pa.bool_()),
    )

    def __init__(self, model: str, k: int = 10, exclude_seen: bool = True) -> None:
        self._template = RecommendJob(users=["probe"], model=model, k=k, exclude_seen=exclude_seen)
        self.model, self.k, self.exclude_seen = model, k, exclude_seen

    def options(self) -> dict[str, Any]:
        return {"model": self.model, "k": self.k, "exclude_seen": self.exclude_seen}

    def model_ref(self) -> str | None:
        return self.model

    def chunk_size(self, settings: Settings) -> int:
        # The worker's recommend batches hold at least 512 users.
        return min(MAX_USERS_PER_JOB, 2 * max(settings.max_batch_size, 512))

    def in_flight(self, settings: Settings) -> int:
        return 4

    def check(self, value: Any) -> tuple[str | None, str | None]:
        user, error = _text_value(value, "user id")
        if user is not None and len(user) > MAX_USER_CHARS:
            return None, f"user id has {len(user)} characters, over the limit of {MAX_USER_CHARS}"
        return user, error

    def job(self, job_id: str, values: list[str]) -> JobBase:
        return self._template.model_copy(update=_bulk(job_id, users=values))

    def columns(self, result: dict[str, Any], count: int) -> dict[str, list[Any]]:
        rows = result["results"]
        if len(rows) != count:
            raise ValueError(f"recommend result has {len(rows)} rows for {count} users")
        return {
            "items": [json.dumps([{"item": i["item"], "score": i["score"]} for i in r["items"]]) for r in rows],
            "fallback": [bool(r.get("fallback", False)) for r in rows],
        }


_ARROW_TYPES: Final = {"string": pa.string(), "float": pa.float64(), "int": pa.int64(), "json": pa.string()}


class ItemScoring:
    """Bulk scoring for any kind that declares ``score_columns``: each row is one entry of the
    kind's ``items`` list field (its value, or ``{score_row: value}``), the run's options are the
    job's other fields, and each row's columns are keys of its entry in the result's ``results``."""

    def __init__(self, spec: kinds.KindSpec, **options: Any) -> None:
        if spec.items is None or not spec.score_columns:
            raise ValueError(f"{spec.name} declares no items field and score columns")
        self.spec = spec
        self.job_type = spec.name
        self.items = spec.items
        self.result_fields = tuple(pa.field(c.name, _ARROW_TYPES[c.type]) for c in spec.score_columns)
        self._options = {k: v for k, v in options.items() if v is not None}
        self._item = TypeAdapter(typing.get_args(spec.job.model_fields[spec.items].annotation)[0] or Any)
        item_schema = spec.job.model_json_schema()["properties"][spec.items]
        self._max_items = int(item_schema.get("maxItems", MAX_TEXTS_PER_JOB))
        # Validate the options once, with a probe row, so a bad option fails before anything runs.
        self._template: JobBase | None
        try:
            self._template = spec.job.model_validate({**self._options, self.items: [self._wrap("probe")]})
        except ValidationError as exc:
            problems = [e for e in exc.errors() if (e.get("loc") or ("",))[0] != self.items]
            if problems:
                raise
            self._template = None

    def _wrap(self, value: Any) -> Any:
        return {self.spec.score_row: value} if self.spec.score_row else value

    def options(self) -> dict[str, Any]:
        return dict(self._options)

    def model_ref(self) -> str | None:
        model = getattr(self._template, "model", None) if self._template is not None else self._options.get("model")
        return model if isinstance(model, str) else None

    def chunk_size(self, settings: Settings) -> int:
        return max(1, min(self._max_items, 4 * settings.max_batch_size))

    def in_flight(self, settings: Settings) -> int:
        return 4

    def check(self, value: Any) -> tuple[Any, str | None]:
        checked, error = _text_value(value, self.items.rstrip("s"))
        if error is not None:
            return None, error
        item = self._wrap(checked)
        try:
            self._item.validate_python(item)
        except ValidationError as exc:
            return None, describe_validation_error(exc)
        return checked, None

    def job(self, job_id: str, values: list[Any]) -> JobBase:
        fields = {**self._options, self.items: [self._wrap(v) for v in values], **_bulk(job_id)}
        return self.spec.job.model_validate(fields)

    def columns(self, result: dict[str, Any], count: int) -> dict[str, list[Any]]:
        rows = result["results"]
        if len(rows) != count:
            raise ValueError(f"{self.job_type} result has {len(rows)} rows for {count} items")
        out: dict[str, list[Any]] = {}
        for column in self.spec.score_columns:
            values = [row.get(column.key) for row in rows]
            if column.type == "json":
                out[column.name] = [json.dumps(v, ensure_ascii=False) for v in values]
            elif column.type == "float":
                out[column.name] = [None if v is None else float(v) for v in values]
            elif column.type == "int":
                out[column.name] = [None if v is None else int(v) for v in values]
            else:
                out[column.name] = [None if v is None else str(v) for v in values]
        return out


def scoring(job_type: str) -> Callable[..., Scoring]:
    """The bulk-scoring adapter of a job kind, from the registry: the kind's own class
    (``KindSpec.scoring``) or the generic ``ItemScoring`` for its ``score_columns``."""
    spec = kinds.get(job_type)
    if spec.scoring is not None:
        adapter: type[Scoring] = kinds.import_path(spec.scoring)
        return adapter
    if spec.score_columns:
        return partial(ItemScoring, spec)
    raise kinds.UnknownKind(f"{job_type} jobs have no bulk scoring")
