"""The baseline for scripts/bench.py: plain Celery, one task per input, no batching.

Same model code as Conveyor's runners, called with one item at a time, so the comparison
isolates what dynamic batching buys. Started by the benchmark as
``celery -A plain_celery_worker worker -P solo`` with scripts/ on PYTHONPATH.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celery import Celery

from shared.model_store import ModelStore
from workers.model_cache import ModelCache

URL = os.environ["CONVEYOR_REDIS_URL"]
app = Celery("plain", broker=URL, backend=URL)
app.conf.update(
    task_serializer="json", result_serializer="json", accept_content=["json"], worker_prefetch_multiplier=1
)
_store = ModelStore(Path(os.environ.get("CONVEYOR_MODEL_DIR", "/nonexistent")))
_cache = ModelCache(8 << 30)
_runners: dict[str, Any] = {}


def _runner(kind: str) -> Any:
    if kind not in _runners:
        if kind == "classify":
            from workers.runners.classify import ClassifyRunner

            _runners[kind] = ClassifyRunner(_store, _cache)
        elif kind == "recommend":
            from workers.runners.recommend import RecommendRunner

            _runners[kind] = RecommendRunner(_store, _cache, "cpu")
        elif kind == "transcribe":
            from workers.runners.transcribe import TranscribeRunner

            _runners[kind] = TranscribeRunner(_store, _cache, "cpu")
    return _runners[kind]


@app.task(name="plain.classify")
def classify(text: str, labels: list[str]) -> dict[str, Any]:
    from workers.runners.classify import ClassifyItem

    (out,) = _runner("classify").run_batch([ClassifyItem(text, tuple(labels), None, None, "This text is about {}.")])
    if isinstance(out, BaseException):
        raise out
    return dict(out)
