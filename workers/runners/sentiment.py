"""Sentiment: a trained sequence classifier from the store (default ``sentiment-minilm``) labels
each text; the labels are the model's own (positive, negative, neutral for the default).

Built on classify's trained-model path by composition: ``ClassifyRunner`` loads, places and
caches the models (dtype per device) and serves a model without a fast tokenizer, and its
``ClassifyItem`` and token-count cost are the items. What it adds is where the tokenizing
happens: texts are tokenized when their jobs are prepared, every text of every job naming a
model in one call of that model's Rust tokenizer (outside the GIL, while the device runs the
previous batch); a batch only pads the ids, and each model in it gets one forward pass and the
batch one transfer to the host.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from typing import Any, Final

import numpy as np
import torch

from shared.errors import InvalidJob
from shared.jobs import JobBase
from shared.kinds.sentiment import DEFAULT_SENTIMENT_MODEL, SentimentJob
from shared.model_store import ModelStore, ModelVersion
from workers.batcher import Batcher, BatchPolicy
from workers.kinds import PinnedModels, Prepared
from workers.model_cache import ModelCache
from workers.runners.classify import ClassifyItem, ClassifyRunner, TextEncoder

TOKENIZER_CACHE_SIZE: Final = 16  # tokenizers of the models jobs named lately (a few MB each)
VERSION_CACHE_SIZE: Final = 256


class SentimentRunner:
    def __init__(self, store: ModelStore, cache: ModelCache, device: str = "cpu") -> None:
        self.store = store
        self.classify = ClassifyRunner(store, cache, device)
        self.device = device
        self._encoders: OrderedDict[str, TextEncoder | None] = OrderedDict()  # by model directory
        self._versions: OrderedDict[str, ModelVersion | BaseException] = OrderedDict()  # by pinned ref
        self._lock = threading.Lock()  # the ingest's prepare and the batcher both read the caches

    # -- models ------------------------------------------------------------------------------
    def version(self, ref: str) -> ModelVersion:
        """The pinned version, checked once to be a text classifier (InvalidJob otherwise)."""
        with self._lock:
            found = self._versions.get(ref)
        if found is None:
            try:
                found = _text_classifier(self.store.resolve(ref))
            except (InvalidJob, LookupError) as exc:
                found = exc
            with self._lock:
                self._versions[ref] = found
                while len(self._versions) > VERSION_CACHE_SIZE:
                    self._versions.popitem(last=False)
        if isinstance(found, BaseException):
            raise found
        return found

    def encoder(self, version: ModelVersion) -> TextEncoder | None:
        """The model's own tokenizer (Rust side only, safe across threads); None where the model
        has no ``tokenizer.json``: its texts are tokenized in the batch by transformers."""
        key = str(version.path)
        with self._lock:
            if key in self._encoders:
                self._encoders.move_to_end(key)
                return self._encoders[key]
        encoder = TextEncoder(version.path) if (version.path / "tokenizer.json").is_file() else None
        with self._lock:
            self._encoders[key] = encoder
            while len(self._encoders) > TOKENIZER_CACHE_SIZE:
                self._encoders.popitem(last=False)
        return encoder

    def warm_up(self) -> None:
        try:
            self.classify._classifier(self.version(DEFAULT_SENTIMENT_MODEL))
        except (InvalidJob, LookupError):
            pass  # not prepared here: jobs that name it fail with ModelNotFound

    # -- items ---------------------------------------------------------------------------------
    def items(self, texts: Sequence[str], ref: str) -> list[ClassifyItem]:
        """One item per text, tokenized (all of them in one call) for the model ``ref`` names."""
        encoder = self.encoder(self.version(ref))
        if encoder is None:
            return [ClassifyItem(text, model=ref) for text in texts]
        return [ClassifyItem(text, model=ref, ids=ids) for text, ids in zip(texts, encoder.encode(texts))]

    cost = staticmethod(ClassifyRunner.cost)

    def run_batch(self, items: list[ClassifyItem]) -> list[dict[str, Any] | BaseException]:
        results: list[dict[str, Any] | BaseException] = [RuntimeError("no result")] * len(items)
        groups: dict[tuple[str, bool], list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            groups[(item.model or DEFAULT_SENTIMENT_MODEL, item.ids is not None)].append(i)
        with torch.inference_mode():
            for (ref, tokenized), indices in groups.items():
                group = [items[i] for i in indices]
                try:
                    outs = self._forward(ref, group) if tokenized else self._untokenized(ref, group)
                except (InvalidJob, LookupError) as exc:  # a model gone from the store fails its own items only
                    outs = [exc] * len(group)
                for i, out in zip(indices, outs):
                    results[i] = out
        return results

    def _forward(self, ref: str, items: list[ClassifyItem]) -> list[dict[str, Any] | BaseException]:
        model, _tokenizer = self.classify._classifier(self.version(ref))
        limit = min(getattr(model.config, "max_position_embeddings", 512) or 512, 512)
        rows = [_truncated(item.ids or (), limit) for item in items]
        pad = model.config.pad_token_id
        longest = max(len(row) for row in rows)
        input_ids = np.full((len(rows), longest), pad if pad is not None else 0, dtype=np.int64)
        mask = np.zeros((len(rows), longest), dtype=np.int64)
        for n, row in enumerate(rows):
            input_ids[n, : len(row)] = row
            mask[n, : len(row)] = 1
        input_t = torch.from_numpy(input_ids).to(self.device, non_blocking=True)
        mask_t = torch.from_numpy(mask).to(self.device, non_blocking=True)
        logits = model(input_ids=input_t, attention_mask=mask_t).logits
        probs = torch.softmax(logits.float(), dim=-1).cpu().numpy().astype(np.float64)
        labels = _labels(model.config, probs.shape[-1])
        return [_sentiment(labels, row) for row in probs]

    def _untokenized(self, ref: str, items: list[ClassifyItem]) -> list[dict[str, Any] | BaseException]:
        """Classify's own trained-model path (it tokenizes in the batch), its ranking turned into ours."""
        ranked = self.classify._trained(ref, items)
        out: list[dict[str, Any] | BaseException] = []
        for entry in ranked:
            if isinstance(entry, BaseException):
                out.append(entry)
                continue
            best = entry["labels"][0]
            out.append({
                "label": best["label"], "score": best["score"],
                "scores": {s["label"]: s["score"] for s in entry["labels"]},
            })  # fmt: skip
        return out


def _truncated(ids: Sequence[int], limit: int) -> Sequence[int]:
    """At most ``limit`` ids, the closing special token kept."""
    return ids if len(ids) <= limit else [*ids[: limit - 1], ids[-1]]


def _labels(config: Any, n: int) -> tuple[str, ...]:
    id2label = getattr(config, "id2label", None) or {}
    return tuple(str(id2label.get(i, f"LABEL_{i}")) for i in range(n))


def _sentiment(labels: Sequence[str], probs: Any) -> dict[str, Any]:
    """One text's result as the JSON ``TextSentiment`` describes: the best label, its
    probability, and every label's, in the model's order."""
    scores = [round(p, 6) for p in probs.tolist()]
    best = int(np.argmax(probs))
    return {"label": labels[best], "score": scores[best], "scores": dict(zip(labels, scores))}


def _text_classifier(version: ModelVersion) -> ModelVersion:
    """``version`` if it is a sequence classifier (a fine-tuned one, or a plain Hugging Face
    directory whose config says so); an embedder, Whisper or a recommender is refused."""
    if version.kind == "text-classifier":
        return version
    if version.kind == "unknown":
        try:
            config = json.loads((version.path / "config.json").read_text())
        except (OSError, ValueError):
            config = {}
        architectures = config.get("architectures") if isinstance(config, dict) else None
        if isinstance(architectures, list) and any(str(a).endswith("ForSequenceClassification") for a in architectures):
            return version
    raise InvalidJob(
        f"model {version.ref!r} is not a text classifier ({version.kind}): sentiment needs a sequence-classification"
        f" model, such as {DEFAULT_SENTIMENT_MODEL} or one made by a fine-tune job"
    )


class SentimentKind:
    """sentiment jobs: items are texts, tokenized here for the model each job names."""

    job_type = "sentiment"
    slow_prepare = False

    def __init__(self, store: ModelStore, cache: ModelCache, device: str) -> None:
        self.store = store
        self.runner = SentimentRunner(store, cache, device)

    def build_batcher(self, policy: BatchPolicy) -> Batcher[Any, Any]:
        self.runner.warm_up()
        return Batcher(self.runner.run_batch, policy, cost=self.runner.cost, name="sentiment-batcher")

    def prepare(self, jobs: Sequence[JobBase]) -> list[Prepared | BaseException]:
        out: list[Prepared | BaseException] = []
        models = PinnedModels(self.store)  # fail fast, and pin @latest for the whole job
        by_model: dict[str, list[int]] = defaultdict(list)
        for n, job in enumerate(jobs):
            assert isinstance(job, SentimentJob)
            pinned = models.pin(job.model)
            if isinstance(pinned, str):
                try:
                    self.runner.version(pinned)
                except (InvalidJob, LookupError) as exc:
                    pinned = exc
            if isinstance(pinned, BaseException):
                out.append(pinned)
                continue
            out.append(Prepared(list(job.texts), pinned))
            by_model[pinned].append(n)
        for ref, numbers in by_model.items():  # every text naming one model, in one tokenizer call
            group = [p for n in numbers if isinstance(p := out[n], Prepared)]
            try:
                items = iter(self.runner.items([text for p in group for text in p.items], ref))
            except Exception as exc:  # a model whose tokenizer cannot load fails its own jobs only
                for n in numbers:
                    out[n] = exc
                continue
            for prepared in group:
                prepared.items = [next(items) for _ in prepared.items]
        return out

    def finish(self, job: JobBase, prepared: Prepared, outputs: list[Any]) -> dict[str, Any]:
        return {"results": outputs}
