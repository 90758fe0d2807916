"""compress: a smaller, faster version of a model (int8 dynamic quantization of its Linear
layers, for CPUs), published as NAME@N+1 with what it costs measured against its parent."""

from __future__ import annotations

from typing import Final, Literal

from pydantic import Field

from shared.jobs import ColumnName, FilePath, JobBase, ModelRef, OutputName
from shared.kinds.spec import CliOption, KindSpec
from shared.model_store import parse_ref
from shared.results import TrainingResult

MAX_EVAL_ROWS: Final = 20_000
MAX_LATENCY_SECONDS: Final = 120.0


class EvaluationFields(JobBase):
    """The labelled file a model is measured on (evaluate, and compress's comparison)."""

    input_column: ColumnName | None = Field(
        default=None,
        description="The inputs' column: texts for text models (default 'text'), audio paths for Whisper"
        " (default 'audio'), users for recommenders (default 'user'), image paths for images (default 'image').",
    )
    label_column: ColumnName | None = Field(
        default=None,
        description="The expected answers' column: labels (default 'label'), reference transcripts (default"
        " 'text'), held-out items (default 'item').",
    )
    max_rows: int = Field(default=2000, ge=1, le=MAX_EVAL_ROWS, description="Rows read from the file, at most.")
    evaluate_as: str | None = Field(
        default=None,
        max_length=100,
        pattern=r"^[a-z][a-z0-9-]*$",
        description="The job kind whose evaluation applies (classify, sentiment, transcribe, ...); default: the"
        " model's own (its metadata's task, else the kind that serves its model kind).",
    )


class CompressJob(EvaluationFields):
    """Build a compressed version of a model, measured against its parent."""

    type: Literal["compress"] = "compress"
    model: ModelRef = Field(description="The model to compress: NAME, NAME@N or NAME@ALIAS.")
    method: Literal["int8"] = Field(
        default="int8", description="int8: dynamic int8 quantization of the Linear layers (CPU inference)."
    )
    target_name: OutputName | None = Field(
        default=None, description="Publish under this name (default: the model's own name, as its next version)."
    )
    eval_path: FilePath | None = Field(
        default=None, description="A labelled file on the worker: both versions are measured on it, side by side."
    )
    latency_seconds: float = Field(
        default=20.0, ge=0.0, le=MAX_LATENCY_SECONDS, description="CPU time spent measuring latency (0: not measured)."
    )

    @property
    def output_name(self) -> str:
        """Where the compressed version is published (the training path reads this)."""
        return self.target_name or parse_ref(self.model)[0]


KIND = KindSpec(
    name="compress",
    job=CompressJob,
    result=TrainingResult,
    mode="training",
    runner="workers.compression:compress",
    summary="Compress a model (int8 dynamic quantization) into NAME@N+1, measured against its parent.",
    cli={
        "eval_path": CliOption(flag="--eval", file="path"),
        "target_name": CliOption(flag="--output"),
        "input_column": CliOption(flag="--text-column"),
    },
    example={"model": "my-classifier@2", "method": "int8"},
    demo={"model": "demo-topics@latest", "target_name": "demo-topics-int8", "latency_seconds": 2.0},
    order=20,
)
