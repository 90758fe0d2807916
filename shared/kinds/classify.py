"""classify: texts, zero-shot against labels or with a trained classifier."""

from shared.jobs import ClassifyJob
from shared.kinds.spec import CliOption, KindSpec
from shared.results import ClassifyResult

KIND = KindSpec(
    name="classify",
    job=ClassifyJob,
    result=ClassifyResult,
    mode="inference",
    runner="workers.runners.classify:ClassifyKind",
    summary="Classify texts, zero-shot against --labels or with a trained --model.",
    items="texts",
    scoring="producers.score.kinds:ClassifyScoring",
    cli={"texts": CliOption(flag="--text"), "labels": CliOption(split=True)},
    example={"texts": ["The striker scored twice."], "labels": ["sports", "finance"]},
    order=0,
    evaluation="workers.evaluators.text:ClassifyEvaluation",
    model_kinds=("text-classifier", "sentence-embedding"),
)
