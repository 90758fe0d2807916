"""train: a recommender (BPR or implicit ALS) from an interactions file."""

from shared.jobs import TrainJob
from shared.kinds.spec import CliOption, KindSpec
from shared.results import TrainingResult

KIND = KindSpec(
    name="train",
    job=TrainJob,
    result=TrainingResult,
    mode="training",
    runner="workers.training.recommender:train_recommender",
    summary="Train a recommender; the model lands in the store as OUTPUT@N.",
    cli={"interactions_path": CliOption(flag="--interactions", file="path"), "output_name": CliOption(flag="--output")},
    example={"interactions_path": "/data/interactions.csv", "output_name": "my-recommender"},
    order=3,
)
