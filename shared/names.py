"""Queue and task names: the contract between producers (in any language) and workers.

A producer sends ``TASKS[job_type]`` to ``QUEUES[job_type]`` with the job's JSON as the
single positional argument (or as the keyword argument ``job``).
"""

from __future__ import annotations

from typing import Final, Literal

JobType = Literal["classify", "transcribe", "recommend", "train", "fine-tune"]
JOB_TYPES: Final[tuple[JobType, ...]] = ("classify", "transcribe", "recommend", "train", "fine-tune")

# One queue per inference type, so queue depth per type is visible; long jobs
# (train, fine-tune) share one queue that is consumed one job at a time per device.
TRAINING_QUEUE: Final = "conveyor.training"
QUEUES: Final[dict[str, str]] = {
    "classify": "conveyor.classify",
    "transcribe": "conveyor.transcribe",
    "recommend": "conveyor.recommend",
    "train": TRAINING_QUEUE,
    "fine-tune": TRAINING_QUEUE,
}
INFERENCE_QUEUES: Final[tuple[str, ...]] = ("conveyor.classify", "conveyor.transcribe", "conveyor.recommend")
# Bulk offline scoring (`conveyor score`) sends its chunks here, under the same task names:
# an inference worker takes from these only when every interactive queue is empty, at every
# priority, so a bulk run never delays interactive jobs by more than the batch in flight.
BULK_QUEUES: Final[dict[str, str]] = {
    "classify": "conveyor.bulk.classify",
    "transcribe": "conveyor.bulk.transcribe",
    "recommend": "conveyor.bulk.recommend",
}
# What an inference worker consumes, most urgent first.
WORKER_INFERENCE_QUEUES: Final[tuple[str, ...]] = INFERENCE_QUEUES + tuple(BULK_QUEUES.values())

TASKS: Final[dict[str, str]] = {
    "classify": "conveyor.classify",
    "transcribe": "conveyor.transcribe",
    "recommend": "conveyor.recommend",
    "train": "conveyor.train",
    "fine-tune": "conveyor.fine_tune",
}

# Redis keys written by Conveyor itself (beside Celery's own).
IDEMPOTENCY_KEY_PREFIX: Final = "conveyor:idempotency:"
CANCEL_KEY_PREFIX: Final = "conveyor:cancel:"
# Dead letters: a hash id -> entry (JSON) and a sorted set id -> time, see shared/dead_letters.py.
DEAD_LETTER_KEY: Final = "conveyor:dlq"
DEAD_LETTER_ORDER_KEY: Final = "conveyor:dlq:order"
