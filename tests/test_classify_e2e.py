"""Classify end to end: real Redis, a real worker process, real all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import Celery

from producers.client import Client
from shared.errors import JobFailed
from shared.jobs import ClassifyJob
from shared.results import ClassifyResult

pytestmark = pytest.mark.slow

LABELS = ["sports", "finance", "cooking", "weather"]
TOPICAL = {
    "sports": [
        "The goalkeeper made a brilliant save and the team won the cup final.",
        "She won the hundred metres sprint at the athletics championship.",
        "The basketball player scored forty points in the playoff game.",
    ],
    "finance": [
        "The central bank raised interest rates to slow inflation.",
        "Shares fell sharply after the company reported a quarterly loss.",
        "Investors moved their money into government bonds.",
    ],
    "cooking": [
        "Stir the flour into the melted butter and add the milk slowly.",
        "Bake the bread in a hot oven until the crust is golden.",
        "Marinate the chicken in garlic, lemon and herbs overnight.",
    ],
    "weather": [
        "Heavy rain and strong winds are forecast for the coast tomorrow.",
        "Temperatures will drop below freezing with snow overnight.",
        "A sunny afternoon with a light breeze and no clouds.",
    ],
}


def test_obviously_topical_texts_get_the_right_label(client: Client, worker: Any) -> None:
    texts = [t for topic in LABELS for t in TOPICAL[topic]]
    result = client.submit(ClassifyJob(texts=texts, labels=LABELS)).result(timeout=120)
    assert isinstance(result, ClassifyResult)
    assert len(result.results) == len(texts)
    expected = [topic for topic in LABELS for _ in TOPICAL[topic]]
    for text, got, want in zip(texts, result.results, expected):
        assert got.labels[0].label == want, f"{text!r}: {got.labels}"
        assert abs(sum(s.score for s in got.labels) - 1.0) < 1e-3
        assert [s.score for s in got.labels] == sorted((s.score for s in got.labels), reverse=True)
    assert result.meta.model == "all-MiniLM-L6-v2" and result.meta.device == "cpu"


def test_two_hundred_jobs_at_once_all_complete_correctly_in_real_batches(client: Client, worker: Any) -> None:
    topics = [LABELS[i % len(LABELS)] for i in range(200)]
    jobs = [
        ClassifyJob(texts=[TOPICAL[topic][i % 3]], labels=LABELS, top_k=2) for i, topic in enumerate(topics)
    ]
    handles = client.submit_many(jobs)
    assert [h.id for h in handles] == [j.id for j in jobs]
    results = [h.result(timeout=300) for h in handles]
    batch_sizes = []
    for job, topic, result in zip(jobs, topics, results):
        assert isinstance(result, ClassifyResult)
        assert result.job_id == job.id
        assert result.results[0].labels[0].label == topic
        assert len(result.results[0].labels) == 2  # top_k honoured
        batch_sizes.extend(result.meta.batch_sizes)
    assert max(batch_sizes) > 1, "dynamic batching never put two jobs in one forward pass"


def test_malformed_jobs_fail_alone_with_clear_messages(client: Client, worker: Any) -> None:
    good = [ClassifyJob(texts=[TOPICAL["finance"][0]], labels=LABELS) for _ in range(6)]
    good_handles = client.submit_many(good[:3])
    bad_payloads: list[tuple[Any, str]] = [
        ({"texts": [], "labels": LABELS}, "texts: List should have at least 1 item"),
        ({"texts": ["ok"], "labels": ["only-one"]}, "labels: List should have at least 2 items"),
        ({"texts": ["ok"]}, "exactly one of 'labels'"),
        ({"texts": ["x" * 30_000], "labels": LABELS}, "texts.0: String should have at most 20000 characters"),
        ({"texts": "not a list", "labels": LABELS}, "texts: Input should be a valid list"),
        ("just a string", "the job must be a JSON object"),
    ]
    bad = [client.app.send_task("conveyor.classify", args=[p], queue="conveyor.classify") for p, _ in bad_payloads]
    good_handles += client.submit_many(good[3:])
    for async_result, (_, message) in zip(bad, bad_payloads):
        with pytest.raises(JobFailed) as failed:
            client.job(async_result.id).result(timeout=60)
        assert failed.value.error_type == "InvalidJob"
        assert message in failed.value.message
    for handle in good_handles:
        assert handle.result(timeout=60).results[0].labels[0].label == "finance"  # type: ignore[attr-defined]
    assert worker.proc.poll() is None


def test_unknown_model_is_a_clear_error_listing_what_exists(client: Client, worker: Any) -> None:
    with pytest.raises(JobFailed) as failed:
        client.submit(ClassifyJob(texts=["hello"], model="no-such-model")).result(timeout=60)
    assert failed.value.error_type == "ModelNotFound"
    assert "no-such-model" in failed.value.message and "all-MiniLM-L6-v2" in failed.value.message


def test_a_plain_celery_client_speaks_the_protocol(redis_url: str, worker: Any) -> None:
    """Another producer: only Celery and JSON, no Conveyor code, job fields as kwargs."""
    other = Celery("someone-else", broker=redis_url, backend=redis_url)
    other.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
    sent = other.send_task(
        "conveyor.classify",
        kwargs={"texts": ["Snow and ice closed the mountain roads."], "labels": ["weather", "finance"]},
        queue="conveyor.classify",
    )
    value = sent.get(timeout=60)
    assert value["job_id"] == sent.id
    assert value["results"][0]["labels"][0]["label"] == "weather"
    other.close()


def test_the_same_idempotency_key_runs_once(client: Client, worker: Any) -> None:
    key = f"order-{datetime.now(UTC).timestamp()}"
    first = client.submit(ClassifyJob(texts=["A rainy day."], labels=["weather", "sports"], idempotency_key=key))
    second = client.submit(ClassifyJob(texts=["A rainy day."], labels=["weather", "sports"], idempotency_key=key))
    assert second.id == first.id
    assert first.result(timeout=60).results[0].labels[0].label == "weather"  # type: ignore[attr-defined]


def test_a_job_past_its_deadline_expires(client: Client, worker: Any) -> None:
    past = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    sent = client.app.send_task(
        "conveyor.classify", args=[{"texts": ["late"], "labels": ["a", "b"], "deadline": past}],
        queue="conveyor.classify",
    )  # fmt: skip
    with pytest.raises(JobFailed) as failed:
        client.job(sent.id).result(timeout=60)
    assert failed.value.error_type == "JobExpired"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "producers.cli", *args], capture_output=True, text=True, timeout=180)


def test_cli_submits_waits_and_reports(worker: Any) -> None:
    out = _cli("submit", "classify", "--text", "The chef sliced onions for the stew.", "--labels",
               "cooking,finance", "--wait")  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["results"][0]["labels"][0]["label"] == "cooking"

    queued = _cli("submit", "classify", "--text", "Stocks rallied.", "--labels", "finance,cooking")
    job_id = json.loads(queued.stdout)["id"]
    fetched = _cli("result", job_id, "--wait")
    assert json.loads(fetched.stdout)["job_id"] == job_id
    assert json.loads(_cli("status", job_id).stdout)["state"] == "SUCCESS"

    overview = json.loads(_cli("status").stdout)
    assert any(name.startswith("cpu@") for name in overview["workers"])
    assert "conveyor.classify" in overview["queues"]

    bad = _cli("submit", "classify", "--text", "x", "--labels", "only-one")
    assert bad.returncode == 2 and "labels" in bad.stderr
