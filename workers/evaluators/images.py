"""classify-image: top-1 and top-5 accuracy against the file's labels.

The file has an image column (a path, absolute or relative to the file, under the worker's
input roots) and a label column holding class names as the model states them (ImageNet's for
the built-in EfficientNet-Lite0). Images are decoded and classified as classify-image jobs are.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from shared.errors import InvalidJob
from shared.input_paths import resolve_input
from shared.kinds.classify_image import BUILTIN_IMAGE_MODEL
from shared.kinds.compress import EvaluationFields
from shared.model_store import ModelStore, ModelVersion
from shared.settings import Settings
from workers.evaluation import Labelled
from workers.image_decode import load_image_file
from workers.model_cache import ModelCache
from workers.runners.classify_image import ClassifyImageRunner, ImageItem
from workers.training.data import read_labeled_texts

TOP_K = 5
NO_INT8 = (
    "EfficientNet-Lite0 computes with convolutions; int8 dynamic quantization covers Linear layers only"
    " (here its classifier head: a fraction of a percent of the compute)"
)


class ImageEvaluation:
    default_columns: ClassVar[tuple[str, str]] = ("image", "label")
    int8_refusal: ClassVar[str | None] = NO_INT8
    batch_sizes: ClassVar[tuple[int, ...]] = (1, 4)
    chunk_rows: ClassVar[int] = 16

    def __init__(self, store: ModelStore, cache: ModelCache, device: str) -> None:
        self.runner = ClassifyImageRunner(store, cache, device)

    def read(self, path: Path, input_column: str, label_column: str, max_rows: int, job: EvaluationFields) -> Labelled:
        data = read_labeled_texts(path, input_column, label_column, min_rows=1, field="data_path", min_classes=1)
        settings = Settings()
        images = [
            resolve_input(named if os.path.isabs(named) else str(path.parent / named), settings, input_column)
            for named in data.texts[:max_rows]
        ]
        return Labelled(images, data.labels[: len(images)], data.sha256, (input_column, label_column))

    def predict(self, version: ModelVersion, data: Labelled) -> list[Any]:
        ref = BUILTIN_IMAGE_MODEL if version.version is None and version.name == BUILTIN_IMAGE_MODEL else version.ref
        items = [ImageItem(load_image_file(image, image.name), ref, TOP_K) for image in data.inputs]
        ranked: list[list[str]] = []
        for out in self.runner.run_batch(items):
            if isinstance(out, BaseException):
                raise out
            ranked.append([entry["label"] for entry in out["labels"]])
        return ranked

    def metrics(self, data: Labelled, predictions: Sequence[Any]) -> dict[str, float]:
        n = len(predictions)
        top1 = sum(p[:1] == [label] for p, label in zip(predictions, data.labels)) / n
        top5 = sum(label in p[:TOP_K] for p, label in zip(predictions, data.labels)) / n
        return {"top1": top1, "top5": top5}

    def agreement(self, a: Sequence[Any], b: Sequence[Any]) -> float:
        return sum(x[:1] == y[:1] for x, y in zip(a, b)) / len(a) if a else 0.0

    def module(self, version: ModelVersion) -> Any:
        raise InvalidJob(f"int8 does not apply to {version.ref}: {NO_INT8}")
