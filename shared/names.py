"""Queue and task names: the contract between producers (in any language) and workers.

A producer sends ``TASKS[job_type]`` to ``QUEUES[job_type]`` with the job's JSON as the
single positional argument (or as the keyword argument ``job``).
"""

from __future__ import annotations

from typing import Final

from shared import kinds

# Queue and task names come from the job-kind registry (shared/kinds/): each kind declares its
# own, and these tables are derived from them.
JobType = str  # a registered kind's name: shared.kinds.JOB_TYPES
JOB_TYPES: Final[tuple[str, ...]] = kinds.JOB_TYPES
TRAINING_QUEUE: Final = kinds.TRAINING_QUEUE
QUEUES: Final[dict[str, str]] = kinds.QUEUES
TASKS: Final[dict[str, str]] = kinds.TASKS
INFERENCE_QUEUES: Final[tuple[str, ...]] = kinds.INFERENCE_QUEUES
# Bulk offline scoring (`conveyor score`) sends its chunks here, under the same task names:
# an inference worker takes from these only when every interactive queue is empty, at every
# priority, so a bulk run never delays interactive jobs by more than the batch in flight.
BULK_QUEUES: Final[dict[str, str]] = kinds.BULK_QUEUES
# What an inference worker consumes, most urgent first.
WORKER_INFERENCE_QUEUES: Final[tuple[str, ...]] = INFERENCE_QUEUES + tuple(BULK_QUEUES.values())
# Every queue Conveyor's workers consume (what Flower, the exporter and `conveyor status` watch).
ALL_QUEUES: Final[tuple[str, ...]] = (*WORKER_INFERENCE_QUEUES, TRAINING_QUEUE)

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
