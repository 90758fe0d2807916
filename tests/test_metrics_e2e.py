"""A real inference worker records its jobs and batches (workers/metrics.py, wired into the
worker) and the exporter shows them: after a known workload the scraped values move by exactly
that workload. The session's worker and Redis are shared with other tests, so the test compares
scrapes before and after."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import WorkerProcess
from test_metrics import Samples, exporter_settings, scrape, value

from producers.client import Client
from producers.exporter import Exporter
from shared.errors import JobFailed
from shared.jobs import ClassifyJob
from shared.metrics_keys import BATCH_SIZE_BUCKETS, bound_label

pytestmark = pytest.mark.slow


@pytest.fixture
def exporter(redis_url: str, tmp_path: Path) -> Iterator[Exporter]:
    exp = Exporter(exporter_settings(redis_url, tmp_path), port=0).start()
    yield exp
    exp.stop()


def _totals(s: Samples) -> dict[str, float]:
    jt = {"job_type": "classify"}
    out = {
        "success": value(s, "conveyor_jobs_total", state="SUCCESS", **jt) or 0.0,
        "failure": value(s, "conveyor_jobs_total", state="FAILURE", **jt) or 0.0,
        "batches": value(s, "conveyor_batch_size_count", **jt) or 0.0,
        "items": value(s, "conveyor_batch_size_sum", **jt) or 0.0,
        "waits": value(s, "conveyor_job_queue_wait_seconds_count", **jt) or 0.0,
        "runs": value(s, "conveyor_job_run_seconds_count", **jt) or 0.0,
    }
    for bound in BATCH_SIZE_BUCKETS:
        le = str(float(bound))
        out[f"le={bound_label(bound)}"] = value(s, "conveyor_batch_size_bucket", le=le, **jt) or 0.0
    return out


def test_a_known_workload_moves_the_scraped_values_by_exactly_that(
    worker: WorkerProcess, client: Client, exporter: Exporter
) -> None:
    time.sleep(1.5)  # whatever ran before has been flushed
    before = _totals(scrape(exporter.url))
    sizes: list[int] = []
    for n in (1, 2, 5):  # one job at a time: each job's texts ride alone, in batches it reports
        handle = client.submit(ClassifyJob(texts=[f"text {i}" for i in range(n)], labels=["sports", "finance"]))
        per_item = handle.result(timeout=120).meta.batch_sizes  # type: ignore[attr-defined]
        # Each item reports the size of its batch; alone in the worker, a batch of b holds b of ours.
        sizes += [b for b, items in Counter(per_item).items() for _ in range(items // b)]
    for _ in range(2):
        with pytest.raises(JobFailed, match=r"ModelNotFound|no-such-model"):
            client.submit(ClassifyJob(texts=["x"], model="no-such-model")).result(timeout=120)
    assert sum(sizes) == 8, sizes

    expected = {"success": 3, "failure": 2, "batches": len(sizes), "items": 8, "waits": 5, "runs": 5}
    for bound in BATCH_SIZE_BUCKETS:
        expected[f"le={bound_label(bound)}"] = sum(1 for size in sizes if size <= bound)  # cumulative
    deadline = time.monotonic() + 15
    while True:
        after = _totals(scrape(exporter.url))
        delta = {k: after[k] - before[k] for k in expected}
        if delta == expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert delta == expected, worker.tail()
