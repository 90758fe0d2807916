"""Text classification: zero-shot by embedding similarity (all-MiniLM-L6-v2), or a trained
sequence-classification model from the store. One item is one text; a batch may mix
zero-shot label sets and trained models: each model gets one forward pass, each label set
one matrix product, and the batch one transfer to the host.

Texts are tokenized once, when their jobs are prepared (many jobs in one call of the Rust
``tokenizers`` backend, outside the GIL, while the device runs the previous batch); the
batch only pads the ids. The token counts are the batcher's cost, so nothing is tokenized twice.
"""

from __future__ import annotations

import time
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from shared.errors import InvalidJob
from shared.jobs import ClassifyJob, JobBase, apply_label_template
from shared.model_store import ModelStore, ModelVersion
from workers.batcher import Batcher, BatchPolicy
from workers.kinds import PinnedModels, Prepared
from workers.model_cache import ModelCache
from workers.quantization import for_serving

EMBEDDER = "all-MiniLM-L6-v2"
EMBED_MAX_TOKENS = 256  # what all-MiniLM-L6-v2 was trained with
# Softmax temperature that turns cosine similarities into probabilities over the given labels.
ZERO_SHOT_TEMPERATURE = 0.05
LABEL_CACHE_SIZE = 4096
# Zero-shot looks up the embedder's name again at most this often: a publish under it (a
# compressed all-MiniLM-L6-v2@1) is served from the next batch after, without a restart.
EMBEDDER_RECHECK_S = 2.0


@dataclass(frozen=True, slots=True)
class ClassifyItem:
    text: str
    labels: tuple[str, ...] | None = None
    model: str | None = None  # a resolved version ref (NAME@N) or a plain name; None: zero-shot
    top_k: int | None = None
    template: str = "{}"
    ids: tuple[int, ...] | None = None  # the embedder's token ids (zero-shot), set by ``encode``


def model_dtype(device: str) -> torch.dtype:
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # fp16/bf16 are many times slower on CPUs


class TextEncoder:
    """The embedder's tokenizer, Rust side only: truncation fixed once, no padding state, so
    ``encode`` is safe from any number of threads (transformers' fast tokenizer switches its
    padding per call and fails across threads with "Already borrowed")."""

    def __init__(self, model_dir: Path) -> None:
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._tokenizer.enable_truncation(EMBED_MAX_TOKENS)
        self._tokenizer.no_padding()
        self.pad_id = self._tokenizer.token_to_id("[PAD]") or 0

    def encode(self, texts: Sequence[str]) -> list[tuple[int, ...]]:
        return [tuple(e.ids) for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=True)]


class ClassifyRunner:
    def __init__(
        self, store: ModelStore, cache: ModelCache, device: str = "cpu", embedder: ModelVersion | None = None
    ) -> None:
        self.store = store
        self.cache = cache
        self.device = device
        self.dtype = model_dtype(device)
        # The zero-shot embedder: all-MiniLM-L6-v2's newest version (or the built-in), or the one given.
        self._embedder_version = embedder or store.resolve(EMBEDDER)
        self._embedder_fixed = embedder is not None
        self._embedder_checked = time.monotonic()
        self.encoder = TextEncoder(self._embedder_version.path)  # versions of the name share its tokenizer
        self._label_vectors: OrderedDict[str, torch.Tensor] = OrderedDict()

    # -- loading -----------------------------------------------------------------------
    def _embedder(self) -> Any:
        path = str(self._embedder_version.path)

        def load() -> Any:
            model = AutoModel.from_pretrained(path, dtype=self.dtype)
            model = for_serving(model, self._embedder_version.path, self.device)  # int8 where its metadata says
            return model.to(self.device).eval()

        return self.cache.get(path, load)

    def refresh_embedder(self) -> None:
        """Follow the embedder's name to its newest version (checked every ``EMBEDDER_RECHECK_S``);
        called where a zero-shot batch starts, so one batch never mixes two embedders."""
        if self._embedder_fixed or time.monotonic() - self._embedder_checked < EMBEDDER_RECHECK_S:
            return
        self._embedder_checked = time.monotonic()
        try:
            found = self.store.resolve(EMBEDDER)
        except (InvalidJob, LookupError):
            return  # gone from the store: keep serving the loaded one
        if found.path != self._embedder_version.path:
            self._embedder_version = found
            self._label_vectors.clear()  # they were the previous embedder's

    def _classifier(self, version: ModelVersion) -> tuple[Any, Any]:
        path = str(version.path)

        def load() -> _Loaded:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=self.dtype)
            model = for_serving(model, version.path, self.device)  # int8 where its metadata says
            return _Loaded(model.to(self.device).eval(), tokenizer)

        loaded = self.cache.get(path, load)
        return loaded.model, loaded.tokenizer

    def warm_up(self) -> None:
        self._embedder()

    # -- batching contract ---------------------------------------------------------------
    def encode(self, items: Sequence[ClassifyItem]) -> list[ClassifyItem]:
        """The items with their token ids, all texts in one tokenizer call."""
        ids = self.encoder.encode([item.text for item in items])
        return [_with_ids(item, i) for item, i in zip(items, ids)]

    @staticmethod
    def cost(item: ClassifyItem) -> int:
        """Token count: the batcher's token budget counts these. Trained models tokenize with
        their own tokenizer; the embedder's count is close enough for a budget."""
        return len(item.ids) if item.ids is not None else len(item.text) // 4 + 2

    def run_batch(self, items: list[ClassifyItem]) -> list[dict[str, Any] | BaseException]:
        results: list[dict[str, Any] | BaseException] = [RuntimeError("no result")] * len(items)
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
        return results

    # -- zero-shot -------------------------------------------------------------------------
    def _embed_ids(self, ids: Sequence[Sequence[int]]) -> torch.Tensor:
        longest = max(len(row) for row in ids)
        input_ids = np.full((len(ids), longest), self.encoder.pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), longest), dtype=np.int64)
        for n, row in enumerate(ids):
            input_ids[n, : len(row)] = row
            mask[n, : len(row)] = 1
        input_t = torch.from_numpy(input_ids).to(self.device, non_blocking=True)
        mask_t = torch.from_numpy(mask).to(self.device, non_blocking=True)
        hidden = self._embedder()(input_ids=input_t, attention_mask=mask_t).last_hidden_state
        m = mask_t.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)  # mean pooling, as the model was trained
        return torch.nn.functional.normalize(pooled.float(), dim=-1)

    def _label_matrix(self, sentences: tuple[str, ...]) -> torch.Tensor:
        """Embeddings of label sentences, cached: most jobs reuse a handful of label sets."""
        missing = list(dict.fromkeys(s for s in sentences if s not in self._label_vectors))
        if missing:
            for sentence, vector in zip(missing, self._embed_ids(self.encoder.encode(missing))):
                self._label_vectors[sentence] = vector
            while len(self._label_vectors) > LABEL_CACHE_SIZE:
                self._label_vectors.popitem(last=False)
        for sentence in sentences:
            self._label_vectors.move_to_end(sentence)
        return torch.stack([self._label_vectors[s] for s in sentences])

    def _zero_shot(self, items: list[ClassifyItem]) -> list[dict[str, Any] | BaseException]:
        self.refresh_embedder()
        missing = [n for n, item in enumerate(items) if item.ids is None]
        if missing:  # items built without ``encode`` (in-process callers)
            encoded = self.encode([items[n] for n in missing])
            items = list(items)
            for n, item in zip(missing, encoded):
                items[n] = item
        text_vectors = self._embed_ids([item.ids or () for item in items])
        # One matrix product per label set (and template), one host transfer for the batch.
        sets: dict[tuple[tuple[str, ...], str], list[int]] = defaultdict(list)
        for n, item in enumerate(items):
            sets[(item.labels or (), item.template)].append(n)
        parts: list[torch.Tensor] = []
        for (labels, template), rows in sets.items():
            # The template's one {} slot is filled by a split, never str.format (which runs format fields).
            matrix = self._label_matrix(tuple(apply_label_template(template, label) for label in labels))
            sims = text_vectors[rows] @ matrix.T
            probs = torch.softmax(sims / ZERO_SHOT_TEMPERATURE, dim=1)
            parts.append(torch.stack([probs, sims]).flatten())
        flat = torch.cat(parts).cpu().numpy().astype(np.float64)
        outs: list[dict[str, Any] | BaseException] = [RuntimeError("no result")] * len(items)
        at = 0
        for (labels, _template), rows in sets.items():
            size = len(rows) * len(labels)
            probs_np = flat[at : at + size].reshape(len(rows), len(labels))
            sims_np = flat[at + size : at + 2 * size].reshape(len(rows), len(labels))
            at += 2 * size
            orders = np.argsort(-probs_np, axis=1, kind="stable")
            for r, n in enumerate(rows):
                outs[n] = _ranked(labels, probs_np[r], sims_np[r], orders[r], items[n].top_k)
        return outs

    # -- trained classifiers ---------------------------------------------------------------
    def _trained(self, model_ref: str, items: list[ClassifyItem]) -> list[dict[str, Any] | BaseException]:
        model, tokenizer = self._classifier(self.store.resolve(model_ref))
        limit = min(getattr(model.config, "max_position_embeddings", 512), 512)
        # Only the batcher thread uses a trained model's tokenizer: no sharing across threads.
        batch = tokenizer(
            [item.text for item in items], padding=True, truncation=True, max_length=limit, return_tensors="pt"
        ).to(self.device)
        probs = torch.softmax(model(**batch).logits.float(), dim=-1).cpu().numpy().astype(np.float64)
        id2label = model.config.id2label
        labels = tuple(str(id2label.get(i, i)) for i in range(probs.shape[-1]))
        orders = np.argsort(-probs, axis=1, kind="stable")
        return [_ranked(labels, probs[n], None, orders[n], item.top_k) for n, item in enumerate(items)]


@dataclass(frozen=True)
class _Loaded:
    model: Any
    tokenizer: Any

    def parameters(self) -> Any:  # lets the model cache measure it
        return self.model.parameters()

    def buffers(self) -> Any:
        return self.model.buffers()

    @property
    def nbytes(self) -> int:  # an int8 model's packed weights (neither parameters nor buffers)
        return int(getattr(self.model, "nbytes", 0))


def _with_ids(item: ClassifyItem, ids: tuple[int, ...]) -> ClassifyItem:
    return ClassifyItem(item.text, item.labels, item.model, item.top_k, item.template, ids)


def _ranked(labels: Sequence[str], scores: Any, sims: Any | None, order: Any, top_k: int | None) -> dict[str, Any]:
    """One text's ranking as the JSON ``TextClassification`` describes, built as plain dicts."""
    keep = order[: top_k or len(labels)].tolist()
    score_list = scores.tolist()
    if sims is None:
        return {"labels": [{"label": labels[i], "score": round(score_list[i], 6), "similarity": None} for i in keep]}
    sim_list = sims.tolist()
    return {
        "labels": [
            {"label": labels[i], "score": round(score_list[i], 6), "similarity": round(sim_list[i], 6)} for i in keep
        ]
    }


class ClassifyKind:
    """classify jobs: items are texts; zero-shot texts are tokenized here, once."""

    job_type = "classify"
    slow_prepare = False

    def __init__(self, store: ModelStore, cache: ModelCache, device: str) -> None:
        self.store = store
        self.runner = ClassifyRunner(store, cache, device)

    def build_batcher(self, policy: BatchPolicy) -> Batcher[Any, Any]:
        self.runner.warm_up()
        return Batcher(self.runner.run_batch, policy, cost=self.runner.cost, name="classify-batcher")

    def prepare(self, jobs: Sequence[JobBase]) -> list[Prepared | BaseException]:
        out: list[Prepared | BaseException] = []
        models = PinnedModels(self.store)  # fail fast, and pin @latest for the whole job
        texts: list[str] = []
        for job in jobs:
            assert isinstance(job, ClassifyJob)
            model_ref: str | None = None
            if job.model is not None:
                pinned = models.pin(job.model)
                if isinstance(pinned, BaseException):
                    out.append(pinned)
                    continue
                model_ref = pinned
            labels = tuple(job.labels) if job.labels else None
            items = [ClassifyItem(t, labels, model_ref, job.top_k, job.label_template) for t in job.texts]
            if model_ref is None:
                texts.extend(job.texts)
            out.append(Prepared(items, model_ref or EMBEDDER, context=model_ref is None))
        if texts:  # every zero-shot text of every job, in one tokenizer call
            ids = iter(self.runner.encoder.encode(texts))
            for prepared in out:
                if isinstance(prepared, Prepared) and prepared.context:  # zero-shot
                    prepared.items = [_with_ids(item, next(ids)) for item in prepared.items]
        return out

    def finish(self, job: JobBase, prepared: Prepared, outputs: list[Any]) -> dict[str, Any]:
        return {"results": outputs}
