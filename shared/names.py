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
# How often the ingest has taken a job (kombu's redeliveries included), by id: past
# CONVEYOR_MAX_DELIVERIES the job is failed and dead-lettered instead of run again.
DELIVERIES_KEY_PREFIX: Final = "conveyor:deliveries:"
# An explicit job id, claimed at submit (SET NX, for as long as results are kept): sent once.
JOB_ID_KEY_PREFIX: Final = "conveyor:job:"

# kombu's Redis transport keeps one list per Celery priority step (0 is served first): the
# queue's own name for step 0, the name + separator + step for 1-9. Every client must agree
# on the separator (kombu's default), so it is spelled out here for tools that read the lists.
PRIORITY_SEP: Final = "\x06\x16"


def priority_list(queue: str, celery_priority: int) -> str:
    """The Redis list holding ``queue``'s messages of one Celery priority (0-9)."""
    return queue if celery_priority == 0 else f"{queue}{PRIORITY_SEP}{celery_priority}"


def priority_lists(queue: str) -> tuple[str, ...]:
    """All ten of ``queue``'s lists, most urgent first."""
    return tuple(priority_list(queue, p) for p in range(10))
