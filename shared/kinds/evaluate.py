"""evaluate: measure one model version on a labelled file; the metrics are recorded in that
version's metadata with the file's SHA-256 (``conveyor models show``). What the metrics are is
the serving kind's (``KindSpec.evaluation``): accuracy and macro-F1 for classifiers, WER for
transcription, recall@k and NDCG@k for recommenders, top-1 and top-5 for images."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shared.jobs import FilePath, ModelRef
from shared.kinds.compress import EvaluationFields
from shared.kinds.spec import CliOption, KindSpec
from shared.model_store import parse_ref
from shared.results import TrainingResult


class EvaluateJob(EvaluationFields):
    """Evaluate a model version on a labelled file."""

    type: Literal["evaluate"] = "evaluate"
    model: ModelRef = Field(description="The model to evaluate: NAME, NAME@N or NAME@ALIAS (pinned when it starts).")
    data_path: FilePath = Field(description="A labelled CSV, TSV or JSONL file on the worker.")
    k: int = Field(default=10, ge=1, le=1000, description="Recommenders: the cut-off of recall@k and NDCG@k.")

    @property
    def output_name(self) -> str:
        """The name whose version is evaluated (the training path reads this; nothing is published)."""
        return parse_ref(self.model)[0]


KIND = KindSpec(
    name="evaluate",
    job=EvaluateJob,
    result=TrainingResult,
    mode="training",
    runner="workers.evaluation:evaluate",
    summary="Evaluate a model version on a labelled file; the metrics are recorded in its metadata.",
    cli={"data_path": CliOption(flag="--data", file="path"), "input_column": CliOption(flag="--text-column")},
    example={"model": "my-classifier@2", "data_path": "/data/held-out.csv"},
    demo=None,
    order=21,
)
