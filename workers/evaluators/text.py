"""classify and sentiment: accuracy and macro-F1 of the top label against the file's labels.

A sentence-embedding model (all-MiniLM-L6-v2 or a version of it) is evaluated zero-shot, as
classify serves it: every distinct label of the file is a candidate, embedded with classify's
default label template. A sequence classifier answers with its own labels. Models load as the
runners load them (``ClassifyRunner``: dtype per device, int8 where the version says so).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import AutoModel, AutoModelForSequenceClassification

from shared.errors import InvalidJob
from shared.jobs import ClassifyJob
from shared.kinds.compress import EvaluationFields
from shared.model_store import ModelStore, ModelVersion
from workers.evaluation import Labelled
from workers.model_cache import ModelCache
from workers.runners.classify import ClassifyItem, ClassifyRunner
from workers.runners.sentiment import _text_classifier
from workers.training.data import read_labeled_texts
from workers.training.finetune import classification_metrics

ZERO_SHOT_KINDS = ("sentence-embedding",)
LABEL_TEMPLATE: str = ClassifyJob.model_fields["label_template"].default


class ClassifyEvaluation:
    default_columns: ClassVar[tuple[str, str]] = ("text", "label")
    int8_refusal: ClassVar[str | None] = None
    batch_sizes: ClassVar[tuple[int, ...]] = (1, 8, 32, 64)
    chunk_rows: ClassVar[int] = 64

    def __init__(self, store: ModelStore, cache: ModelCache, device: str) -> None:
        self.store, self.cache, self.device = store, cache, device
        self._runners: dict[Path, ClassifyRunner] = {}

    def _runner(self, version: ModelVersion) -> ClassifyRunner:
        """A runner whose zero-shot embedder is ``version`` (one per embedder), or the default one."""
        key = version.path if self._zero_shot(version) else Path()
        if key not in self._runners:
            embedder = version if self._zero_shot(version) else None
            self._runners[key] = ClassifyRunner(self.store, self.cache, self.device, embedder=embedder)
        return self._runners[key]

    @staticmethod
    def _zero_shot(version: ModelVersion) -> bool:
        return version.kind in ZERO_SHOT_KINDS

    def read(self, path: Path, input_column: str, label_column: str, max_rows: int, job: EvaluationFields) -> Labelled:
        data = read_labeled_texts(path, input_column, label_column, min_rows=1, field="data_path", min_classes=1)
        texts, labels = data.texts[:max_rows], data.labels[:max_rows]
        return Labelled(texts, labels, data.sha256, (input_column, label_column), tuple(sorted(set(labels))))

    def predict(self, version: ModelVersion, data: Labelled) -> list[Any]:
        runner = self._runner(version)
        if self._zero_shot(version):
            if len(data.classes) < 2:
                raise InvalidJob("zero-shot evaluation needs at least 2 distinct labels in the file")
            items = [ClassifyItem(text, data.classes, None, 1, LABEL_TEMPLATE) for text in data.inputs]
            outs = runner.run_batch(runner.encode(items))
            return [_top(out) for out in outs]
        model, tokenizer = runner._classifier(self.check(version))
        limit = min(getattr(model.config, "max_position_embeddings", 512) or 512, 512)
        with torch.inference_mode():
            batch = tokenizer(
                list(data.inputs), padding=True, truncation=True, max_length=limit, return_tensors="pt"
            ).to(self.device)
            best = model(**batch).logits.argmax(-1).cpu().tolist()
        id2label = model.config.id2label
        return [str(id2label.get(i, i)) for i in best]

    def check(self, version: ModelVersion) -> ModelVersion:
        if version.kind not in ("text-classifier", "unknown"):
            raise InvalidJob(f"{version.ref} is a {version.kind!r} model, not a text classifier")
        return version

    def metrics(self, data: Labelled, predictions: Sequence[Any]) -> dict[str, float]:
        index = {label: i for i, label in enumerate(data.classes)}
        predicted = np.asarray([index.get(p, -1) for p in predictions])
        actual = np.asarray([index[label] for label in data.labels])
        return classification_metrics(predicted, actual, len(data.classes))

    def agreement(self, a: Sequence[Any], b: Sequence[Any]) -> float:
        return float(np.mean([x == y for x, y in zip(a, b)])) if a else 0.0

    def module(self, version: ModelVersion) -> Any:
        if self._zero_shot(version):
            return AutoModel.from_pretrained(str(version.path), dtype=torch.float32)
        return AutoModelForSequenceClassification.from_pretrained(str(self.check(version).path), dtype=torch.float32)


class SentimentEvaluation(ClassifyEvaluation):
    """sentiment serves sequence classifiers only (its labels: positive, negative, neutral)."""

    @staticmethod
    def _zero_shot(version: ModelVersion) -> bool:
        return False

    def check(self, version: ModelVersion) -> ModelVersion:
        return _text_classifier(version)


def _top(out: dict[str, Any] | BaseException) -> str:
    if isinstance(out, BaseException):
        raise out
    return str(out["labels"][0]["label"])
