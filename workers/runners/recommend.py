"""Top-k recommendations from a trained recommender (see workers.training.recommender).

One item is one user's request. A batch's items are grouped by model version, and each
group is one matrix product (users x factors @ factors x items) and one top-k on the device,
with seen items and non-candidates masked out. Unknown users get the most popular items
(``fallback=True``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from shared.errors import InvalidJob
from shared.jobs import JobBase, RecommendJob
from shared.model_store import ModelStore, ModelVersion
from shared.results import UserRecommendations
from workers.batcher import Batcher, BatchPolicy
from workers.kinds import PinnedModels, Prepared
from workers.model_cache import ModelCache
from workers.training.recommender import FACTORS_FILE, ITEMS_FILE, POPULARITY_FILE, USERS_FILE

RECOMMENDER_KIND = "recommender"
_NEG_INF = float("-inf")


@dataclass(frozen=True, slots=True)
class RecommendItem:
    model: str  # NAME, NAME@latest or NAME@N
    user: str
    k: int = 10
    exclude_seen: bool = True
    candidates: tuple[str, ...] | None = None


@dataclass(frozen=True)
class LoadedRecommender:
    user_factors: torch.Tensor  # (users, d) on the device
    item_factors: torch.Tensor  # (items, d)
    seen_indptr: torch.Tensor  # (users + 1,) int64, on the device
    seen_indices: torch.Tensor  # int64
    popularity: torch.Tensor  # (items,) float: interaction counts, the fallback's score
    users: dict[str, int]
    items: list[str]
    item_index: dict[str, int]

    @property
    def nbytes(self) -> int:  # lets the model cache measure it
        tensors = (self.user_factors, self.item_factors, self.seen_indptr, self.seen_indices, self.popularity)
        return sum(t.numel() * t.element_size() for t in tensors)


def load_recommender(path: Path, device: str) -> LoadedRecommender:
    tensors = load_file(path / FACTORS_FILE, device=device)
    users: list[str] = json.loads((path / USERS_FILE).read_text())
    items: list[str] = json.loads((path / ITEMS_FILE).read_text())
    item_index = {item: i for i, item in enumerate(items)}
    ranked = json.loads((path / POPULARITY_FILE).read_text())
    counts = torch.zeros(len(items))
    counts[torch.tensor([item_index[i] for i in ranked["items"]], dtype=torch.long)] = torch.tensor(
        ranked["counts"], dtype=torch.float32
    )
    return LoadedRecommender(
        user_factors=tensors["user_factors"],
        item_factors=tensors["item_factors"],
        seen_indptr=tensors["seen_indptr"].long(),
        seen_indices=tensors["seen_indices"].long(),
        popularity=counts.to(device),
        users={user: i for i, user in enumerate(users)},
        items=items,
        item_index=item_index,
    )


class RecommendRunner:
    def __init__(self, store: ModelStore, cache: ModelCache, device: str = "cpu") -> None:
        self.store = store
        self.cache = cache
        self.device = device

    def cost(self, item: RecommendItem) -> int:
        return 1

    def _model(self, version: ModelVersion) -> LoadedRecommender:
        if version.kind != RECOMMENDER_KIND:
            raise InvalidJob(f"model {version.ref} is a {version.kind!r} model, not a recommender")
        return self.cache.get(str(version.path), lambda: load_recommender(version.path, self.device))

    def run_batch(self, items: list[RecommendItem]) -> list[dict[str, Any] | BaseException]:
        results: list[dict[str, Any] | BaseException] = [RuntimeError("no result")] * len(items)
        groups: dict[Path, list[int]] = defaultdict(list)
        versions: dict[Path, ModelVersion] = {}
        resolved: dict[str, ModelVersion | BaseException] = {}
        for i, item in enumerate(items):
            if item.model not in resolved:
                try:
                    resolved[item.model] = self.store.resolve(item.model)
                except (InvalidJob, LookupError) as exc:  # a bad model name fails its own items only
                    resolved[item.model] = exc
            version = resolved[item.model]
            if isinstance(version, BaseException):
                results[i] = version
                continue
            versions[version.path] = version
            groups[version.path].append(i)
        with torch.inference_mode():
            for path, indices in groups.items():
                try:
                    model = self._model(versions[path])
                except (InvalidJob, OSError, ValueError, KeyError) as exc:
                    outs: Sequence[dict[str, Any] | BaseException] = [exc] * len(indices)
                else:
                    outs = _recommend(model, [items[i] for i in indices])
                for i, out in zip(indices, outs):
                    results[i] = out
        return results


def _recommend(model: LoadedRecommender, items: list[RecommendItem]) -> list[dict[str, Any] | BaseException]:
    """One scoring pass for a group of requests against the same model."""
    n_items = len(model.items)
    device = model.item_factors.device
    outs: list[dict[str, Any] | BaseException | None] = [None] * len(items)
    allowed: list[torch.Tensor | None] = []
    for n, item in enumerate(items):
        if item.candidates is None:
            allowed.append(None)
            continue
        known = [model.item_index[c] for c in dict.fromkeys(item.candidates) if c in model.item_index]
        if not known:
            outs[n] = InvalidJob(f"none of the {len(item.candidates)} candidate items is known to the model")
        allowed.append(torch.tensor(known, dtype=torch.long) if known else None)

    live = [n for n in range(len(items)) if outs[n] is None]
    if not live:
        return [out for out in outs if out is not None]
    user_rows = [model.users.get(items[n].user) for n in live]
    known_user = torch.tensor([row is not None for row in user_rows], device=device)
    rows = torch.tensor([row or 0 for row in user_rows], dtype=torch.long, device=device)

    scores = model.user_factors[rows] @ model.item_factors.T  # the group's one matrix product
    scores = torch.where(known_user[:, None], scores, model.popularity.expand(len(live), -1))
    exclude = torch.tensor(
        [row is not None and items[n].exclude_seen for n, row in zip(live, user_rows)], device=device
    )
    _mask_seen(scores, model, rows, exclude)
    _mask_non_candidates(scores, [allowed[n] for n in live])

    k = min(max(items[n].k for n in live), n_items)
    top = scores.topk(k, dim=1)
    values, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()
    for pos, n in enumerate(live):
        k_n = items[n].k
        ranked = [
            {"item": model.items[i], "score": s} for s, i in zip(values[pos][:k_n], indices[pos][:k_n]) if s != _NEG_INF
        ]
        # Plain dicts, shaped as ``UserRecommendations``: no pydantic object per user on the hot path.
        outs[n] = {"user": items[n].user, "items": ranked, "fallback": user_rows[pos] is None}
    return [out if out is not None else RuntimeError("no result") for out in outs]


def _mask_seen(scores: torch.Tensor, model: LoadedRecommender, rows: torch.Tensor, exclude: torch.Tensor) -> None:
    """Set -inf where a row's user saw the item (rows with ``exclude`` only), all on the device."""
    starts, ends = model.seen_indptr[rows], model.seen_indptr[rows + 1]
    lengths = torch.where(exclude, ends - starts, 0)
    total = int(lengths.sum())
    if total == 0:
        return
    local = torch.repeat_interleave(torch.arange(len(rows), device=scores.device), lengths)
    first = torch.cumsum(lengths, 0) - lengths  # where each row's run begins in the flat list
    position = torch.arange(total, device=scores.device) - first[local] + starts[local]
    # One fill on the flat view: much faster than 2-D advanced indexing on CPU.
    flat = local * scores.shape[1] + model.seen_indices[position]
    scores.view(-1).index_fill_(0, flat, _NEG_INF)


def _mask_non_candidates(scores: torch.Tensor, allowed: list[torch.Tensor | None]) -> None:
    restricted = [n for n, a in enumerate(allowed) if a is not None]
    if not restricted:
        return
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[restricted] = False
    for n in restricted:
        keep[n, allowed[n].to(scores.device)] = True  # type: ignore[union-attr]
    scores.masked_fill_(~keep, _NEG_INF)


def recommend_in_process(
    runner: RecommendRunner, users: Sequence[str], model: str, k: int = 10, batch_size: int = 64
) -> list[UserRecommendations]:
    """Recommendations for many users without a queue, ``batch_size`` users per ``run_batch`` (benchmarks)."""
    out: list[UserRecommendations] = []
    for start in range(0, len(users), batch_size):
        batch = [RecommendItem(model=model, user=user, k=k) for user in users[start : start + batch_size]]
        for result in runner.run_batch(batch):
            if isinstance(result, BaseException):
                raise result
            out.append(UserRecommendations.model_validate(result))
    return out


class RecommendKind:
    """recommend jobs: items are users; users from many jobs share one matrix product."""

    job_type = "recommend"
    slow_prepare = False
    min_batch_size = 512  # a user costs one row of a matrix product: batches can be wide

    def __init__(self, store: ModelStore, cache: ModelCache, device: str) -> None:
        self.store = store
        self.runner = RecommendRunner(store, cache, device)

    def build_batcher(self, policy: BatchPolicy) -> Batcher[Any, Any]:
        return Batcher(self.runner.run_batch, policy, cost=self.runner.cost, name="recommend-batcher")

    def prepare(self, jobs: Sequence[JobBase]) -> list[Prepared | BaseException]:
        out: list[Prepared | BaseException] = []
        models = PinnedModels(self.store)  # one store lookup per model per bulk; @latest pinned per job
        for job in jobs:
            assert isinstance(job, RecommendJob)
            ref = models.pin(job.model)
            if isinstance(ref, BaseException):
                out.append(ref)
                continue
            candidates = tuple(job.candidates) if job.candidates else None
            items = [RecommendItem(ref, user, job.k, job.exclude_seen, candidates) for user in job.users]
            out.append(Prepared(items, ref))
        return out

    def finish(self, job: JobBase, prepared: Prepared, outputs: list[Any]) -> dict[str, Any]:
        return {"results": outputs}
