"""Helpers of the model-lifecycle tests: small text classifiers built from the built-in
MiniLM (its real encoder weights, a seeded classification head) and published to a store,
and labelled SMS slices."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import SHARED_DATA

from shared.model_store import ModelStore, ModelVersion


def publish_classifier(store: ModelStore, name: str, labels: list[str], seed: int = 0) -> ModelVersion:
    """A sequence classifier on all-MiniLM-L6-v2 with ``labels`` (a version per call)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = store.resolve("all-MiniLM-L6-v2")
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base.path), num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)}, dtype=torch.float32,
    )  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(str(base.path))

    def write(built: Path) -> None:
        model.save_pretrained(built)
        tokenizer.save_pretrained(built)

    return store.build_and_publish(name, write, {"kind": "text-classifier", "labels": labels, "parent": base.ref})


def sms_slice(path: Path, per_class: int, offset: int = 0) -> Path:
    """``per_class`` ham and spam messages of the SMS Spam Collection, as a text,label CSV."""
    source = SHARED_DATA / "sms_spam" / "SMSSpamCollection.tsv"
    if not source.exists():
        pytest.skip(f"{source} missing")
    rows: dict[str, list[str]] = {"ham": [], "spam": []}
    seen: dict[str, int] = {"ham": 0, "spam": 0}
    with source.open(newline="", encoding="utf-8") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) == 2 and len(rows[row[0]]) < per_class:
                seen[row[0]] += 1
                if seen[row[0]] > offset:
                    rows[row[0]].append(row[1])
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for label, texts in rows.items():
            writer.writerows((t, label) for t in texts)
    return path
