"""The job-kind registry: every module in this package that defines ``KIND`` (a ``KindSpec``) is
a job kind. Adding one is a module here (its schemas and spec) and its runner under
``workers/`` (see README, *Adding a job kind*); the names, the job union, the worker's
dispatch, Celery's tasks and the CLI are derived from this table, and ``tests/test_registry.py``
walks every kind through each of them.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Annotated, Any, Final, Union

from pydantic import BaseModel, Field, TypeAdapter

from shared.jobs import JobBase
from shared.kinds.spec import TRAINING_QUEUE, CliOption, KindSpec, Mode, ScoreColumn

__all__ = [
    "BULK_QUEUES", "INFERENCE_QUEUES", "INFERENCE_TYPES", "JOB_MODELS", "JOB_TYPES", "KINDS", "QUEUES",
    "RESULT_MODELS", "TASKS", "TRAINING_QUEUE", "TRAINING_TYPES", "CliOption", "KindSpec", "Mode", "ScoreColumn",
    "UnknownKind",
    "by_task", "get", "import_path", "parse_job",
]  # fmt: skip


class UnknownKind(LookupError):
    """No job kind by that name."""


def _discover() -> dict[str, KindSpec]:
    found: list[KindSpec] = []
    for module in pkgutil.iter_modules(__path__):
        if module.name == "spec" or module.name.startswith("_"):
            continue
        spec = getattr(importlib.import_module(f"{__name__}.{module.name}"), "KIND", None)
        if not isinstance(spec, KindSpec):
            raise TypeError(f"shared/kinds/{module.name}.py defines no KIND = KindSpec(...)")
        found.append(spec)
    found.sort(key=lambda s: (s.order, s.name))
    kinds: dict[str, KindSpec] = {}
    for spec in found:
        if spec.name in kinds:
            raise ValueError(f"two job kinds are named {spec.name!r}")
        type_field = spec.job.model_fields.get("type")
        if type_field is None or type_field.default != spec.name:
            raise ValueError(f"{spec.job.__name__}.type must default to {spec.name!r}, its kind's name")
        kinds[spec.name] = spec
    tasks = [s.task for s in found]
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"two job kinds share a task name: {sorted(tasks)}")
    return kinds


KINDS: Final[dict[str, KindSpec]] = _discover()

JOB_TYPES: Final[tuple[str, ...]] = tuple(KINDS)
INFERENCE_TYPES: Final[tuple[str, ...]] = tuple(n for n, s in KINDS.items() if s.inference)
TRAINING_TYPES: Final[tuple[str, ...]] = tuple(n for n, s in KINDS.items() if not s.inference)
JOB_MODELS: Final[dict[str, type[JobBase]]] = {n: s.job for n, s in KINDS.items()}
RESULT_MODELS: Final[dict[str, type[BaseModel]]] = {n: s.result for n, s in KINDS.items()}
TASKS: Final[dict[str, str]] = {n: s.task for n, s in KINDS.items()}
QUEUES: Final[dict[str, str]] = {n: s.queue for n, s in KINDS.items()}
INFERENCE_QUEUES: Final[tuple[str, ...]] = tuple(QUEUES[n] for n in INFERENCE_TYPES)
BULK_QUEUES: Final[dict[str, str]] = {n: q for n, s in KINDS.items() if (q := s.bulk_queue) is not None}
_BY_TASK: Final[dict[str, KindSpec]] = {s.task: s for s in KINDS.values()}

# The discriminated union of every job schema, by "type".
_JOB_UNION: Any = Annotated[Union[tuple(JOB_MODELS.values())], Field(discriminator="type")]  # noqa: UP007 - built at run time
_JOB_ADAPTER: Final[TypeAdapter[Any]] = TypeAdapter(_JOB_UNION)


def get(name: str) -> KindSpec:
    try:
        return KINDS[name]
    except KeyError:
        raise UnknownKind(f"unknown job type {name!r}; one of {', '.join(KINDS)}") from None


def by_task(task: str) -> KindSpec | None:
    """The kind a Celery task name belongs to."""
    return _BY_TASK.get(task)


def parse_job(data: Any) -> JobBase:
    """Validate any job by its ``type`` field."""
    job: JobBase = _JOB_ADAPTER.validate_python(data)
    return job


def import_path(path: str) -> Any:
    """The object a spec's ``module:attribute`` path names (imported on first use: runners pull
    in torch, so only workers call this for them)."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)
