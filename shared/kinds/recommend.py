"""recommend: top-k items for users from a trained recommender."""

from shared.jobs import RecommendJob
from shared.kinds.spec import CliOption, KindSpec
from shared.results import RecommendResult

KIND = KindSpec(
    name="recommend",
    job=RecommendJob,
    result=RecommendResult,
    mode="inference",
    runner="workers.runners.recommend:RecommendKind",
    summary="Top-k items for users from a trained recommender.",
    items="users",
    scoring="producers.score.kinds:RecommendScoring",
    cli={"users": CliOption(flag="--user"), "candidates": CliOption(split=True)},
    example={"users": ["u1"], "model": "my-recommender", "k": 5},
    order=2,
    evaluation="workers.evaluators.recommend:RecommendEvaluation",
    model_kinds=("recommender",),
)
