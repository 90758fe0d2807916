"""Job schemas: what producers put on the queue. pydantic v2 and the standard library only.

Every job is one flat JSON object: the envelope fields (``id``, ``type``,
``schema_version``, ``priority``, ``submitted_at``, ``idempotency_key``, ``deadline``)
beside the fields of its type. ``conveyor schema TYPE`` prints the JSON Schema.
Limits live here, and a violation names the field and the limit.

Hostile input is refused here, before any worker code sees it: ids use a small alphabet (and
are still never used as paths); every string anywhere in a job, keys included, is valid
Unicode (no lone surrogates); NUL is refused in every field that names something (ids,
idempotency keys, models, paths, output names, columns, labels, languages, user and item
ids, the label template), other control characters in most of them. Free texts may hold
any valid Unicode. A classify job holds at most ``MAX_CHARS_PER_JOB`` characters in all.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    Base64Bytes,
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError

from shared.wire_text import find_invalid_text

SCHEMA_VERSION: Final = 1

# Limits. Each is enforced by the schema, so a job over one fails before it reaches a batch.
MAX_TEXT_CHARS: Final = 20_000
MAX_TEXTS_PER_JOB: Final = 512
MAX_LABELS: Final = 100
MAX_LABEL_CHARS: Final = 200
MAX_INLINE_AUDIO_BYTES: Final = 16 * 1024 * 1024
MAX_AUDIO_SECONDS: Final = 3600.0
MAX_USERS_PER_JOB: Final = 10_000
MAX_CANDIDATES: Final = 100_000
MAX_K: Final = 1000
MAX_PATH_CHARS: Final = 4096
MAX_ID_CHARS: Final = 200
MAX_ITEM_ID_CHARS: Final = 200  # user and candidate ids of recommend jobs
MAX_KEY_CHARS: Final = 200  # idempotency keys
# All texts of one classify job together: a bulk-scoring chunk (128 rows of up to 20,000) fits;
# the tokenizer reads at most 256 tokens of each text, so more is memory, not signal.
MAX_CHARS_PER_JOB: Final = 3_000_000
MAX_RECOMMENDATIONS_PER_JOB: Final = 1_000_000  # users x k in one recommend job's result
MAX_SEED: Final = 2**32 - 1  # numpy's and torch's seeds both take it

# Job ids (also Celery task ids, Redis key parts, log words): a letter or digit, then letters,
# digits and ``. _ : @ + = -``, with no ``..``. Celery's uuids, hex ids, ``score-...`` chunk
# ids and ``order-17:v2``-style ids pass; ``/``, ``\\``, whitespace, control characters and
# non-ASCII do not. An id is still never used as a path: see workers.training.checkpoint.
ID_PATTERN: Final = r"[A-Za-z0-9][A-Za-z0-9._:@+=-]*"  # the whole id (fullmatch), up to MAX_ID_CHARS
_ID = re.compile(ID_PATTERN)

# NAME, NAME@N, NAME@latest or NAME@ALIAS (an alias: a letter, then letters, digits and . _ -).
MODEL_NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}(@([0-9]+|[A-Za-z][A-Za-z0-9._-]{0,63}))?$"
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
# The published JSON Schema keeps the release's pattern (tests/fixtures/release_contract.json):
# aliases are accepted beyond it, so every job that validated before still does.
RELEASE_MODEL_NAME_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}(@([0-9]+|latest))?$"
_MODEL_REF_DESCRIPTION: Final = "A model in the store: NAME, NAME@latest or NAME@N (a version number)."

ModelRef = Annotated[
    str,
    Field(pattern=MODEL_NAME_PATTERN, description=_MODEL_REF_DESCRIPTION),
    WithJsonSchema({"type": "string", "pattern": RELEASE_MODEL_NAME_PATTERN, "description": _MODEL_REF_DESCRIPTION}),
]
OutputName = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
        description="Name to register the trained model under; each run adds version NAME@N.",
    ),
]


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _no_control_characters(value: str, what: str = "the value") -> str:
    if _CONTROL.search(value):
        raise ValueError(f"{what} must not contain control characters")
    return value


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL (\\x00)")
    return value


def check_job_id(value: str) -> str:
    """``value`` if it is a valid job id (see ``ID_PATTERN``), else ValueError saying why."""
    if not _ID.fullmatch(value) or ".." in value:
        raise ValueError(
            "must start with a letter or digit and hold only ASCII letters, digits and . _ : @ + = -"
            " (no '..', '/', '\\', spaces, control characters or non-ASCII)"
        )
    return value


def _printable_text(value: str) -> str:
    # Idempotency keys become Redis keys and log words: printable Unicode (spaces allowed), no
    # control, format, separator (other than space), private-use or unassigned characters.
    if not value.isprintable():
        raise ValueError("must be printable text: no control characters (NUL, newlines, tabs) or invisible ones")
    return value


FilePath = Annotated[str, Field(min_length=1, max_length=MAX_PATH_CHARS), AfterValidator(_no_control_characters)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED, description="Random seed (0 to 2**32 - 1).")]
ColumnName = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_no_control_characters)]
# User and item ids must match the ids in the training data, which may hold any text but NUL.
ItemId = Annotated[str, Field(min_length=1, max_length=MAX_ITEM_ID_CHARS), AfterValidator(_no_nul)]
Label = Annotated[str, Field(min_length=1, max_length=MAX_LABEL_CHARS)]  # control characters: see _distinct_labels


def check_label_template(template: str) -> str:
    """A template names exactly one ``{}`` slot and has no other brace: it is never run
    through ``str.format``, so ``{0}``, ``{x}`` or ``{{`` would only mislead."""
    if template.count("{}") != 1:
        raise ValueError("label_template must contain {} exactly once, where the label goes")
    rest = template.replace("{}", "", 1)
    if "{" in rest or "}" in rest:
        raise ValueError("label_template may hold no brace besides its one {} slot (no {0}, {name} or {{)")
    return template


def apply_label_template(template: str, label: str) -> str:
    """``template`` with ``label`` in its ``{}`` slot; braces inside the label are kept as they are."""
    before, _, after = check_label_template(template).partition("{}")
    return before + label + after


def _new_id() -> str:
    return uuid.uuid4().hex


def _now() -> datetime:
    return datetime.now(UTC)


class JobBase(BaseModel):
    """The envelope every job carries."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    id: str = Field(
        default_factory=_new_id,
        min_length=1,
        max_length=MAX_ID_CHARS,
        description="Job id; also the Celery task id: a letter or digit, then letters, digits and . _ : @ + = -"
        " (no '..'). Generated when absent.",
    )
    type: str  # each kind's schema narrows it to its name (the registry checks)
    schema_version: Literal[1] = Field(default=SCHEMA_VERSION, description="Version of this schema.")
    priority: int = Field(default=5, ge=0, le=9, description="0 (lowest) to 9 (most urgent).")
    submitted_at: datetime = Field(default_factory=_now, description="When the producer submitted it (UTC).")
    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_KEY_CHARS,
        description="Jobs submitted with the same key while the first is remembered run once.",
    )
    deadline: datetime | None = Field(
        default=None,
        description="If no worker has started the job by then, it fails with JobExpired.",
    )

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        # Every string in the job, keys included, must be valid Unicode: a lone surrogate
        # (JSON's "\\ud800", or bytes decoded with surrogateescape) breaks UTF-8 encoding in
        # logs, Redis and tokenizers far from here. The error names the path, never the text.
        found = find_invalid_text(data)
        if found is not None:
            path, problem = found
            raise ValidationError.from_exception_data(
                cls.__name__,
                [InitErrorDetails(type=PydanticCustomError("invalid_unicode", problem), loc=path, input=None)],
            )
        return data

    @field_validator("id")
    @classmethod
    def _safe_id(cls, value: str) -> str:
        return check_job_id(value)

    @field_validator("idempotency_key")
    @classmethod
    def _printable_key(cls, value: str | None) -> str | None:
        return None if value is None else _printable_text(value)

    @field_validator("submitted_at", "deadline")
    @classmethod
    def _assume_utc(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


def _texts_from_text(data: Any) -> Any:
    """``{"text": "..."}`` is shorthand for ``{"texts": ["..."]}`` in every text kind."""
    if isinstance(data, dict) and "text" in data and "texts" not in data:
        data = dict(data)
        text = data.pop("text")
        data["texts"] = [text] if isinstance(text, str) else text
    return data


def _check_texts(texts: list[str]) -> list[str]:
    """No blank text, and at most MAX_CHARS_PER_JOB characters in all."""
    total = sum(map(len, texts))
    if total > MAX_CHARS_PER_JOB:
        raise ValueError(
            f"the texts hold {total} characters in all, over the limit of {MAX_CHARS_PER_JOB} per job"
            " (MAX_CHARS_PER_JOB): split them into several jobs"
        )
    for i, text in enumerate(texts):
        if not text.strip():
            raise ValueError(f"text {i} is blank")
    return texts


class ClassifyJob(JobBase):
    """Classify one or many texts, zero-shot against ``labels`` or with a trained ``model``."""

    type: Literal["classify"] = "classify"
    # Free text: any valid Unicode, NUL and other control characters included (real texts carry
    # them, tokenizers take them, and a text is never a key, a path or a name).
    texts: list[Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]] = Field(
        min_length=1,
        max_length=MAX_TEXTS_PER_JOB,
        description=f"Texts to classify (1 to {MAX_TEXTS_PER_JOB}, each up to {MAX_TEXT_CHARS} characters,"
        f" {MAX_CHARS_PER_JOB} in all).",
    )
    labels: list[Label] | None = Field(
        default=None,
        min_length=2,
        max_length=MAX_LABELS,
        description="Candidate labels for zero-shot classification by embedding similarity.",
    )
    model: ModelRef | None = Field(
        default=None,
        description="A sequence-classification model in the store (e.g. a fine-tuned one).",
    )
    top_k: int | None = Field(default=None, ge=1, le=MAX_LABELS, description="Keep only the best k labels.")
    label_template: str = Field(
        default="This text is about {}.",
        min_length=2,
        max_length=MAX_LABEL_CHARS,
        description="Zero-shot only: each label is embedded as this sentence, {} standing for the label.",
    )

    @model_validator(mode="before")
    @classmethod
    def _text_alias(cls, data: Any) -> Any:
        return _texts_from_text(data)

    @field_validator("texts")
    @classmethod
    def _not_blank(cls, texts: list[str]) -> list[str]:
        return _check_texts(texts)

    @field_validator("labels")
    @classmethod
    def _distinct_labels(cls, labels: list[str] | None) -> list[str] | None:
        if labels is None:
            return None
        cleaned = [label.strip() for label in labels]
        if any(not label for label in cleaned):
            raise ValueError("labels must not be blank")
        for i, label in enumerate(cleaned):  # after stripping: a trailing newline is still fine
            _no_control_characters(label, f"label {i}")
        if len(set(cleaned)) != len(cleaned):
            raise ValueError("labels must be distinct")
        return cleaned

    @field_validator("label_template")
    @classmethod
    def _one_placeholder(cls, template: str) -> str:
        return check_label_template(_no_nul(template))

    @model_validator(mode="after")
    def _labels_or_model(self) -> ClassifyJob:
        if (self.labels is None) == (self.model is None):
            raise ValueError("give exactly one of 'labels' (zero-shot) or 'model' (a trained classifier)")
        return self


class TextsJob(JobBase):
    """The base of the text kinds (sentiment, ner, keywords): ``texts`` with classify's limits
    (1 to MAX_TEXTS_PER_JOB, each up to MAX_TEXT_CHARS, MAX_CHARS_PER_JOB in all) and its
    ``{"text": "..."}`` shorthand."""

    texts: list[Annotated[str, Field(min_length=1, max_length=MAX_TEXT_CHARS)]] = Field(
        min_length=1,
        max_length=MAX_TEXTS_PER_JOB,
        description=f"Texts (1 to {MAX_TEXTS_PER_JOB}, each up to {MAX_TEXT_CHARS} characters,"
        f" {MAX_CHARS_PER_JOB} in all).",
    )

    @model_validator(mode="before")
    @classmethod
    def _text_alias(cls, data: Any) -> Any:
        return _texts_from_text(data)

    @field_validator("texts")
    @classmethod
    def _not_blank(cls, texts: list[str]) -> list[str]:
        return _check_texts(texts)


class TranscribeJob(JobBase):
    """Transcribe speech from a file the worker can read, or from inline bytes."""

    type: Literal["transcribe"] = "transcribe"
    audio_path: FilePath | None = Field(default=None, description="Path to a WAV, FLAC or OGG file on the worker.")
    audio_b64: Base64Bytes | None = Field(
        default=None,
        description=f"The audio file's bytes, base64-encoded (at most {MAX_INLINE_AUDIO_BYTES} bytes decoded).",
    )
    model: ModelRef = Field(default="whisper-tiny.en", description="A Whisper checkpoint in the store.")
    language: str | None = Field(
        default=None,
        min_length=2,
        max_length=20,
        pattern=r"^(<\|[a-z]{2,3}\|>|[A-Za-z][A-Za-z ]*)$",
        description="Spoken language (multilingual models only): a code such as 'de' or a name such as 'german'.",
    )
    beam_size: int = Field(default=1, ge=1, le=10, description="1 is greedy decoding.")
    max_new_tokens: int | None = Field(default=None, ge=1, le=440, description="Token limit per 30 s window.")
    timestamps: bool = Field(default=False, description="Return segments with start and end times.")

    @model_validator(mode="after")
    def _one_source(self) -> TranscribeJob:
        if (self.audio_path is None) == (self.audio_b64 is None):
            raise ValueError("give exactly one of 'audio_path' or 'audio_b64'")
        if self.audio_b64 is not None:
            if len(self.audio_b64) == 0:
                raise ValueError("audio_b64 is empty")
            if len(self.audio_b64) > MAX_INLINE_AUDIO_BYTES:
                raise ValueError(
                    f"audio_b64 holds {len(self.audio_b64)} bytes, over the limit of {MAX_INLINE_AUDIO_BYTES}"
                )
        return self


class RecommendJob(JobBase):
    """Top-k items for one or many users from a trained recommender."""

    type: Literal["recommend"] = "recommend"
    users: list[ItemId] = Field(
        min_length=1, max_length=MAX_USERS_PER_JOB, description="User ids (as in the training data)."
    )
    k: int = Field(default=10, ge=1, le=MAX_K, description="How many items per user.")
    model: ModelRef = Field(description="A recommender in the store, NAME or NAME@N.")
    exclude_seen: bool = Field(default=True, description="Leave out items the user interacted with in training.")
    candidates: list[ItemId] | None = Field(
        default=None, min_length=1, max_length=MAX_CANDIDATES, description="Rank only these items."
    )

    @model_validator(mode="before")
    @classmethod
    def _user_alias(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            if "user" in data and "users" not in data:
                user = data.pop("user")
                data["users"] = user if isinstance(user, list) else [user]
            # Ids may arrive as numbers from other producers; they are matched as strings.
            for key in ("users", "candidates"):
                if isinstance(data.get(key), list):
                    data[key] = [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in data[key]]
        return data

    @model_validator(mode="after")
    def _bounded_result(self) -> RecommendJob:
        # users x k items come back in one result: 10,000 users at k=1000 would be ~200 MB of JSON.
        if len(self.users) * self.k > MAX_RECOMMENDATIONS_PER_JOB:
            raise ValueError(
                f"{len(self.users)} users x k={self.k} is {len(self.users) * self.k} recommendations, over the "
                f"limit of {MAX_RECOMMENDATIONS_PER_JOB} per job (MAX_RECOMMENDATIONS_PER_JOB): split the users"
            )
        return self


class TrainJob(JobBase):
    """Train a recommender on an interactions file (user, item[, weight|rating][, time])."""

    type: Literal["train"] = "train"
    interactions_path: FilePath = Field(description="CSV, TSV or JSONL on the worker with user and item columns.")
    output_name: OutputName
    model_type: Literal["bpr", "als"] = Field(default="bpr", description="BPR matrix factorization or implicit ALS.")
    factors: int = Field(default=64, ge=1, le=1024)
    epochs: int = Field(default=10, ge=1, le=1000)
    regularization: float = Field(
        default=0.01,
        ge=0.0,
        le=1000.0,
        description="L2 strength. Unset: 0.01 for BPR, 10 for ALS (where it is the solver's lambda).",
    )
    learning_rate: float = Field(default=0.01, gt=0.0, le=10.0, description="BPR only.")
    batch_size: int = Field(default=4096, ge=1, le=1_000_000, description="BPR only.")
    holdout: int = Field(default=1, ge=1, le=100, description="Latest interactions per user held out for metrics.")
    seed: Seed = 0

    @model_validator(mode="after")
    def _regularization_per_model(self) -> TrainJob:
        # The two models read the number on different scales (measured on MovieLens 100K:
        # BPR overfits below ~0.01; ALS does best around 10-50).
        if "regularization" not in self.model_fields_set and self.model_type == "als":
            self.regularization = 10.0
        return self


class FineTuneJob(JobBase):
    """Fine-tune a text classifier on a labeled CSV or JSONL file."""

    type: Literal["fine-tune"] = "fine-tune"
    data_path: FilePath = Field(description="CSV or JSONL on the worker with a text and a label column.")
    output_name: OutputName
    base_model: ModelRef = Field(default="all-MiniLM-L6-v2")
    text_column: ColumnName = "text"
    label_column: ColumnName = "label"
    epochs: int = Field(default=3, ge=1, le=100)
    learning_rate: float = Field(default=5e-5, gt=0.0, le=1.0)
    batch_size: int = Field(default=16, ge=1, le=1024)
    max_length: int = Field(default=128, ge=8, le=512)
    validation_split: float = Field(default=0.1, gt=0.0, lt=0.9)
    validation_path: FilePath | None = None
    seed: Seed = 0


# The union of every job kind (``Job``), ``JOB_MODELS`` and ``parse_job`` are derived from the
# job-kind registry: ``shared.kinds``.


def is_model_ref(name: str) -> bool:
    return bool(_MODEL_NAME.match(name))
