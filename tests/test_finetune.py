"""Fine-tuning all-MiniLM-L6-v2 into a spam classifier on a slice of the real SMS Spam Collection."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from shared.errors import InvalidJob, JobCancelled
from shared.jobs import FineTuneJob
from shared.model_store import ModelStore
from shared.results import Progress
from workers.training.finetune import classification_metrics, fine_tune, stratified_split

SMS = Path(__file__).resolve().parents[2] / "shared" / "data" / "sms_spam" / "SMSSpamCollection.tsv"


@pytest.fixture(autouse=True)
def _inputs_under_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_INPUT_ROOTS", str(tmp_path))  # jobs read files only under the input roots


def sms_slice(path: Path, n: int, seed: int = 0) -> Path:
    """A stratified random slice of n messages as CSV (label, text), spam at its corpus share."""
    if not SMS.exists():
        pytest.skip(f"{SMS} is missing")
    # label<TAB>text, no header, quoting off: split each line on its first tab.
    rows = [line.split("\t", 1) for line in SMS.read_text(encoding="utf-8").splitlines()]
    rng = random.Random(seed)
    by_label = {label: [r for r in rows if r[0] == label] for label in ("ham", "spam")}
    n_spam = round(n * len(by_label["spam"]) / len(rows))
    picked = rng.sample(by_label["spam"], n_spam) + rng.sample(by_label["ham"], n - n_spam)
    rng.shuffle(picked)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "text"])
        writer.writerows(picked)
    return path


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def test_stratified_split_keeps_class_shares() -> None:
    labels = ["a"] * 90 + ["b"] * 10
    train, valid = stratified_split(labels, 0.2, seed=1)
    assert sorted(np.concatenate([train, valid]).tolist()) == list(range(100))
    assert sum(labels[i] == "b" for i in valid) == 2 and len(valid) == 20
    assert np.array_equal(valid, stratified_split(labels, 0.2, seed=1)[1])  # seeded


def test_stratified_split_needs_two_of_each_label() -> None:
    with pytest.raises(InvalidJob, match="a label has 1 example"):
        stratified_split(["a"] * 9 + ["b"], 0.2, seed=0)


def test_classification_metrics() -> None:
    m = classification_metrics(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 2)
    assert m["accuracy"] == 0.75
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_missing_label_column_fails_before_loading_the_model(store: ModelStore, tmp_path: Path) -> None:
    data = sms_slice(tmp_path / "sms.csv", 40)
    job = FineTuneJob(data_path=str(data), output_name="spam", label_column="category")
    with pytest.raises(InvalidJob, match="no column 'category' \\(label_column\\) among the header's 2 columns"):
        fine_tune(job, store, tmp_path / "ckpt", lambda p: None, lambda: False)


@pytest.mark.slow
def test_cancel_publishes_nothing(store: ModelStore, tmp_path: Path) -> None:
    data = sms_slice(tmp_path / "sms.csv", 40)
    job = FineTuneJob(data_path=str(data), output_name="spam", max_length=16)
    with pytest.raises(JobCancelled):
        fine_tune(job, store, tmp_path / "ckpt", lambda p: None, lambda: True)
    assert store.versions("spam") == []


@pytest.mark.slow
def test_fine_tune_spam_one_epoch(store: ModelStore, tmp_path: Path) -> None:
    data = sms_slice(tmp_path / "sms.csv", 400)
    job = FineTuneJob(
        data_path=str(data),
        output_name="spam",
        epochs=1,
        batch_size=8,
        learning_rate=1e-4,
        max_length=48,
        validation_split=0.25,
    )
    reports: list[Progress] = []
    outcome = fine_tune(job, store, tmp_path / "ckpt", reports.append, lambda: False)

    m = outcome.metrics
    # Measured (seed 0, 300 training rows, 1 epoch): accuracy 0.99, macro-F1 0.979 on 100 held-out
    # messages, where always answering "ham" scores 0.86 (and macro-F1 0.46).
    assert m["majority_accuracy"] == pytest.approx(0.86)
    assert m["accuracy"] >= m["majority_accuracy"] + 0.07
    assert m["macro_f1"] >= 0.85
    assert outcome.epochs_run == 1 and outcome.resumed_from_epoch == 0
    assert reports[-1].epoch == 1 and reports[-1].step == reports[-1].steps

    version = outcome.version
    assert version.ref == "spam@1"
    meta = store.resolve("spam").metadata
    assert meta["kind"] == "text-classifier" and meta["parent"] == "all-MiniLM-L6-v2"
    assert meta["labels"] == ["ham", "spam"] and meta["job_id"] == job.id and meta["epochs"] == 1
    assert meta["metrics"] == {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}

    model = AutoModelForSequenceClassification.from_pretrained(str(version.path)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(version.path))
    assert model.config.id2label == {0: "ham", 1: "spam"}
    texts = [
        "WINNER!! You have been selected to receive a £900 prize reward! To claim call 09061701461. Valid 12 hours",
        "Ok, I'll see you at home after work. Do you want me to pick up some bread?",
    ]
    with torch.inference_mode():
        logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    assert [model.config.id2label[i] for i in logits.argmax(-1).tolist()] == ["spam", "ham"]
