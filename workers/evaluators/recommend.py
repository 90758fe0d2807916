"""recommend: recall@k and NDCG@k of each user's top k against their held-out items.

The file has a user and an item column, one held-out interaction a row; each user's items are
their relevant set. Recommendations are served as recommend jobs get them (items seen in
training left out); an unknown user gets the popular items, as a job would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from shared.errors import InvalidJob
from shared.kinds.compress import EvaluationFields
from shared.model_store import ModelStore, ModelVersion
from workers.evaluation import Labelled
from workers.model_cache import ModelCache
from workers.runners.recommend import RecommendItem, RecommendRunner, _recommend
from workers.training.data import read_labeled_texts

NO_INT8 = "a recommender is two factor matrices and a dot product: no Linear layers for int8 to quantize"


class RecommendEvaluation:
    default_columns: ClassVar[tuple[str, str]] = ("user", "item")
    int8_refusal: ClassVar[str | None] = NO_INT8
    batch_sizes: ClassVar[tuple[int, ...]] = (1, 64)
    chunk_rows: ClassVar[int] = 256

    def __init__(self, store: ModelStore, cache: ModelCache, device: str) -> None:
        self.runner = RecommendRunner(store, cache, device)

    def read(self, path: Path, input_column: str, label_column: str, max_rows: int, job: EvaluationFields) -> Labelled:
        data = read_labeled_texts(path, input_column, label_column, min_rows=1, field="data_path", min_classes=1)
        relevant: dict[str, set[str]] = {}
        for user, item in zip((u.strip() for u in data.texts), data.labels):
            if user not in relevant and len(relevant) >= max_rows:
                continue  # max_rows bounds the users evaluated
            relevant.setdefault(user, set()).add(item)
        k = int(getattr(job, "k", 10))
        columns = (input_column, label_column)
        return Labelled(list(relevant), list(relevant.values()), data.sha256, columns, extra={"k": k})

    def predict(self, version: ModelVersion, data: Labelled) -> list[Any]:
        model = self.runner._model(version)
        k = int(data.extra.get("k", 10))
        outs = _recommend(model, [RecommendItem(model=version.ref, user=user, k=k) for user in data.inputs])
        ranked: list[list[str]] = []
        for out in outs:
            if isinstance(out, BaseException):
                raise out
            ranked.append([entry["item"] for entry in out["items"]])
        return ranked

    def metrics(self, data: Labelled, predictions: Sequence[Any]) -> dict[str, float]:
        k = int(data.extra.get("k", 10))
        recall = ndcg = 0.0
        for relevant, top in zip(data.labels, predictions):
            hits = [item in relevant for item in top[:k]]
            recall += sum(hits) / len(relevant)
            ideal = sum(1.0 / math.log2(i + 2) for i in range(min(k, len(relevant))))
            ndcg += sum(1.0 / math.log2(i + 2) for i, hit in enumerate(hits) if hit) / ideal
        n = len(predictions)
        return {f"recall@{k}": recall / n, f"ndcg@{k}": ndcg / n}

    def agreement(self, a: Sequence[Any], b: Sequence[Any]) -> float:
        return sum(x[:1] == y[:1] for x, y in zip(a, b)) / len(a) if a else 0.0

    def module(self, version: ModelVersion) -> Any:
        raise InvalidJob(f"int8 does not apply to {version.ref}: {NO_INT8}")
