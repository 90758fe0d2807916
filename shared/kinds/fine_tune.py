"""fine-tune: a text classifier from a labeled file."""

from shared.jobs import FineTuneJob
from shared.kinds.spec import CliOption, KindSpec
from shared.results import TrainingResult

KIND = KindSpec(
    name="fine-tune",
    job=FineTuneJob,
    result=TrainingResult,
    mode="training",
    runner="workers.training.finetune:fine_tune",
    summary="Fine-tune a text classifier; classify can use OUTPUT by name as soon as it finishes.",
    cli={
        "data_path": CliOption(flag="--data", file="path"),
        "output_name": CliOption(flag="--output"),
        "validation_path": CliOption(flag="--validation", file="path"),
    },
    example={"data_path": "/data/labeled.csv", "output_name": "my-classifier"},
    order=4,
)
