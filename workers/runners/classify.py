"""Text classification: zero-shot by embedding similarity (all-MiniLM-L6-v2), or a trained
sequence-classification model from the store. One item is one text; a batch may mix
zero-shot label sets and trained models: each group gets one forward pass."""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from shared.errors import InvalidJob
from shared.model_store import ModelStore, ModelVersion
from shared.results import LabelScore, TextClassification
from workers.model_cache import ModelCache

EMBEDDER = "all-MiniLM-L6-v2"
EMBED_MAX_TOKENS = 256  # what all-MiniLM-L6-v2 was trained with
# Softmax temperature that turns cosine similarities into probabilities over the given labels.
ZERO_SHOT_TEMPERATURE = 0.05
LABEL_CACHE_SIZE = 4096


@dataclass(frozen=True)
class ClassifyItem:
    text: str
    labels: tuple[str, ...] | None = None
    model: str | None = None  # a resolved version ref (NAME@N) or a plain name
    top_k: int | None = None
    template: str = "{}"


def model_dtype(device: str) -> torch.dtype:
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # fp16/bf16 are many times slower on CPUs


class ClassifyRunner:
    def __init__(self, store: ModelStore, cache: ModelCache, device: str = "cpu") -> None:
        self.store = store
        self.cache = cache
        self.device = device
        self.dtype = model_dtype(device)
        self._embedder_version = store.resolve(EMBEDDER)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self._embedder_version.path))
        self._label_vectors: OrderedDict[str, torch.Tensor] = OrderedDict()

    # -- loading -----------------------------------------------------------------------
    def _embedder(self) -> Any:
        path = str(self._embedder_version.path)

        def load() -> Any:
            model = AutoModel.from_pretrained(path, dtype=self.dtype)
            return model.to(self.device).eval()

        return self.cache.get(path, load)

    def _classifier(self, version: ModelVersion) -> tuple[Any, Any]:
        path = str(version.path)

        def load() -> tuple[Any, Any]:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=self.dtype)
            return _Loaded(model.to(self.device).eval(), tokenizer)

        loaded = self.cache.get(path, load)
        return loaded.model, loaded.tokenizer

    def warm_up(self) -> None:
        self._embedder()

    # -- batching contract ---------------------------------------------------------------
    def cost(self, item: ClassifyItem) -> int:
        """Token count (capped at the model's limit): the batcher's token budget counts these."""
        ids = self.tokenizer(item.text, truncation=True, max_length=EMBED_MAX_TOKENS)["input_ids"]
        return len(ids)

    def run_batch(self, items: list[ClassifyItem]) -> list[TextClassification | BaseException]:
        results: list[TextClassification | BaseException | None] = [None] * len(items)
        groups: dict[str | None, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            groups[item.model].append(i)
        with torch.inference_mode():
            for model_ref, indices in groups.items():
                group = [items[i] for i in indices]
                try:
                    outs = self._zero_shot(group) if model_ref is None else self._trained(model_ref, group)
                except (InvalidJob, LookupError) as exc:  # a bad model name fails its own items only
                    outs = [exc] * len(group)
                for i, out in zip(indices, outs):
                    results[i] = out
        return [r if r is not None else RuntimeError("no result") for r in results]

    # -- zero-shot -------------------------------------------------------------------------
    def _embed(self, texts: list[str]) -> torch.Tensor:
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=EMBED_MAX_TOKENS, return_tensors="pt"
        ).to(self.device)
        hidden = self._embedder()(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # mean pooling, as the model was trained
        return torch.nn.functional.normalize(pooled.float(), dim=-1)

    def _labels(self, labels: set[str]) -> dict[str, torch.Tensor]:
        """Embeddings of label sentences, cached: most jobs reuse a handful of label sets."""
        missing = [label for label in labels if label not in self._label_vectors]
        if missing:
            for label, vector in zip(missing, self._embed(missing)):
                self._label_vectors[label] = vector
            while len(self._label_vectors) > LABEL_CACHE_SIZE:
                self._label_vectors.popitem(last=False)
        for label in labels:
            self._label_vectors.move_to_end(label)
        return {label: self._label_vectors[label] for label in labels}

    def _zero_shot(self, items: list[ClassifyItem]) -> list[TextClassification | BaseException]:
        text_vectors = self._embed([item.text for item in items])
        label_vectors = self._labels({item.template.format(label) for item in items for label in item.labels or ()})
        outs: list[TextClassification | BaseException] = []
        for item, vector in zip(items, text_vectors):
            labels = list(item.labels or ())
            sims = torch.stack([label_vectors[item.template.format(label)] for label in labels]) @ vector
            probs = torch.softmax(sims / ZERO_SHOT_TEMPERATURE, dim=0)
            outs.append(_ranked(labels, probs.tolist(), sims.tolist(), item.top_k))
        return outs

    # -- trained classifiers ---------------------------------------------------------------
    def _trained(self, model_ref: str, items: list[ClassifyItem]) -> list[TextClassification | BaseException]:
        model, tokenizer = self._classifier(self.store.resolve(model_ref))
        limit = min(getattr(model.config, "max_position_embeddings", 512), 512)
        batch = tokenizer(
            [item.text for item in items], padding=True, truncation=True, max_length=limit, return_tensors="pt"
        ).to(self.device)
        probs = torch.softmax(model(**batch).logits.float(), dim=-1)
        id2label = model.config.id2label
        labels = [str(id2label.get(i, i)) for i in range(probs.shape[-1])]
        return [_ranked(labels, row.tolist(), None, item.top_k) for item, row in zip(items, probs)]


@dataclass(frozen=True)
class _Loaded:
    model: Any
    tokenizer: Any

    def parameters(self) -> Any:  # lets the model cache measure it
        return self.model.parameters()

    def buffers(self) -> Any:
        return self.model.buffers()


def _ranked(
    labels: list[str], scores: list[float], sims: list[float] | None, top_k: int | None
) -> TextClassification:
    order = sorted(range(len(labels)), key=lambda i: scores[i], reverse=True)[: top_k or len(labels)]
    return TextClassification(
        labels=[
            LabelScore(label=labels[i], score=round(scores[i], 6), similarity=None if sims is None else round(sims[i], 6))
            for i in order
        ]
    )
