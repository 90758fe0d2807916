"""Train a recommender (BPR or implicit ALS), measure it against popularity, publish it.

Each user's latest ``holdout`` interactions are held out; the model trains on the rest and
is scored by recall@10 and NDCG@10 on the held-out items, beside a most-popular baseline
ranked the same way (training items excluded for both).

Published files (no pickle anywhere):
- ``factors.safetensors``: ``user_factors`` (users x d), ``item_factors`` (items x d); a score
  is their dot product. ``seen_indptr`` / ``seen_indices``: each user's items as CSR rows.
- ``users.json`` / ``items.json``: the ids, in index order.
- ``popularity.json``: ``{"items": [...], "counts": [...]}``, most popular first.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from safetensors.torch import save_file

from shared.errors import InvalidJob
from shared.input_paths import resolve_input
from shared.jobs import TrainJob
from shared.model_store import RESULT_KEY, ModelStore
from workers.training import checkpoint
from workers.training.data import Interactions, read_interactions
from workers.training.loop import Pacer, ProgressFn, StopFn, TrainingOutcome, job_fingerprint
from workers.training.mf import AlsTrainer, BprTrainer, Csr, FactorTrainer, TrainSet

TOP_K: Final = 10
EVAL_USERS_PER_BLOCK: Final = 1024

FACTORS_FILE: Final = "factors.safetensors"
USERS_FILE: Final = "users.json"
ITEMS_FILE: Final = "items.json"
POPULARITY_FILE: Final = "popularity.json"


@dataclass(frozen=True)
class Split:
    train: TrainSet
    test: Csr  # held-out items per user (empty rows for users not evaluated)
    eval_users: np.ndarray  # users with at least one held-out item


def holdout_split(data: Interactions, holdout: int) -> Split:
    """Hold out each user's ``holdout`` most recent pairs, for users who keep at least one to train on."""
    order = np.lexsort((np.arange(len(data.user)), data.order, data.user))  # by user, then recency
    users = data.user[order]
    counts = np.bincount(data.user, minlength=len(data.users))
    ends = np.cumsum(counts)[users]  # one past each pair's user group
    position_from_end = ends - np.arange(len(order))  # 1 for a user's latest pair
    test = (position_from_end <= holdout) & (counts[users] > holdout)
    if not test.any():
        raise InvalidJob(
            f"no user has more than holdout={holdout} interactions, so nothing can be held out to measure the model"
        )
    train_pairs, test_pairs = order[~test], order[test]
    n_users, n_items = len(data.users), len(data.items)
    train = TrainSet(n_users, n_items, data.user[train_pairs], data.item[train_pairs], data.weight[train_pairs])
    held = Csr.build(data.user[test_pairs], data.item[test_pairs], data.weight[test_pairs], n_users)
    return Split(train, held, np.unique(data.user[test_pairs]))


def ranking_metrics(
    scores_for: Callable[[torch.Tensor], torch.Tensor], split: Split, device: torch.device, k: int = TOP_K
) -> dict[str, float]:
    """Mean recall@k and NDCG@k over evaluated users; ``scores_for(users) -> (len(users), items)``."""
    seen = split.train.by_user()
    discounts = 1.0 / torch.log2(torch.arange(2, k + 2, device=device, dtype=torch.float32))
    recall_sum = ndcg_sum = 0.0
    for start in range(0, len(split.eval_users), EVAL_USERS_PER_BLOCK):
        users = split.eval_users[start : start + EVAL_USERS_PER_BLOCK]
        scores = scores_for(torch.from_numpy(users).to(device)).clone()
        rows, cols = _csr_cells(seen, users)
        scores[torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device)] = float("-inf")
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices
        relevant = torch.zeros_like(scores, dtype=torch.bool)
        rows, cols = _csr_cells(split.test, users)
        relevant[torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device)] = True
        hits = relevant.gather(1, top).float()
        n_relevant = torch.from_numpy(split.test.counts[users]).to(device).float()
        ideal = torch.cumsum(discounts, 0)[(n_relevant.clamp(max=k) - 1).long()]
        recall_sum += float((hits.sum(1) / n_relevant).sum())
        ndcg_sum += float(((hits * discounts[: hits.shape[1]]).sum(1) / ideal).sum())
    n = len(split.eval_users)
    return {f"recall@{k}": recall_sum / n, f"ndcg@{k}": ndcg_sum / n}


def _csr_cells(csr: Csr, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(local row, column) of every entry in the given rows."""
    counts = csr.counts[rows]
    local = np.repeat(np.arange(len(rows)), counts)
    starts = np.repeat(csr.indptr[rows] - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    return local, csr.indices[starts + np.arange(counts.sum())]


def train_recommender(
    job: TrainJob,
    store: ModelStore,
    checkpoint_dir: Path,
    progress: ProgressFn,
    should_stop: StopFn,
    device: str = "cpu",
) -> TrainingOutcome:
    data = read_interactions(resolve_input(job.interactions_path, field="interactions_path"))
    split = holdout_split(data, job.holdout)
    dev = torch.device(device)
    trainer: FactorTrainer
    if job.model_type == "bpr":
        trainer = BprTrainer(
            split.train, job.factors, job.learning_rate, job.regularization, job.batch_size, job.seed, dev
        )
    else:
        trainer = AlsTrainer(split.train, job.factors, job.regularization, job.seed, dev)

    fingerprint = job_fingerprint(job, data.sha256)
    resumed = 0
    restored = checkpoint.latest(checkpoint_dir, fingerprint)
    if restored is not None:
        resumed, state = restored
        resumed = min(resumed, job.epochs)
        trainer.load_state(state)

    pacer = Pacer(progress, should_stop, job.epochs, trainer.steps)
    pacer.check()
    losses: list[float] = []
    epoch_seconds: list[float] = []
    for epoch in range(resumed + 1, job.epochs + 1):
        pacer.start_epoch()
        losses.append(trainer.run_epoch(epoch, pacer))
        epoch_seconds.append(pacer.epoch_seconds())
        checkpoint.save(checkpoint_dir, epoch, trainer.state(), fingerprint)
        pacer.step(epoch, trainer.steps, 0, losses[-1], force=True)

    users_f, items_f = trainer.factors()
    metrics = ranking_metrics(lambda u: users_f[u] @ items_f.T, split, dev)
    train_popularity = torch.from_numpy(np.bincount(split.train.item, minlength=len(data.items))).to(dev).float()
    baseline = ranking_metrics(lambda u: train_popularity.expand(len(u), -1), split, dev)
    pacer.check()  # a cancel during evaluation still publishes nothing

    seconds = sum(epoch_seconds)
    result_metrics = {**metrics, **{f"popular_{name}": value for name, value in baseline.items()}}
    extra: dict[str, Any] = {
        "losses": losses,
        "seconds_per_epoch": seconds / len(epoch_seconds) if epoch_seconds else None,
        "samples_per_s": split.train.size * len(epoch_seconds) / seconds if seconds else None,
        "train_interactions": split.train.size,
        "eval_users": len(split.eval_users),
        "dropped_rows": data.dropped_rows,
    }
    metadata: dict[str, Any] = {
        "kind": "recommender",
        "model_type": job.model_type,
        "factors": job.factors,
        "job_id": job.id,
        "data_sha256": data.sha256,
        "metrics": metrics,
        "baseline": {"name": "most-popular", **baseline},
        "parent": None,
        "epochs": job.epochs,
        "users": len(data.users),
        "items": len(data.items),
        "interactions": len(data.user),
        "eval_users": len(split.eval_users),
        "holdout": job.holdout,
        # What the job returns, so a redelivery of the job can return it again without training.
        RESULT_KEY: {
            "metrics": result_metrics,
            "epochs_run": len(epoch_seconds),
            "resumed_from_epoch": resumed,
            "extra": extra,
        },
    }
    # A version this job id already published (a concurrent run of the same job) comes back
    # instead of a new one: see ModelStore.publish.
    version = store.build_and_publish(
        job.output_name, lambda built: _write_model(built, data, users_f, items_f), metadata
    )
    checkpoint.clear(checkpoint_dir)
    return TrainingOutcome(
        version=version,
        metrics=result_metrics,
        epochs_run=len(epoch_seconds),
        resumed_from_epoch=resumed,
        extra=extra,
    )


def _write_model(built: Path, data: Interactions, users_f: torch.Tensor, items_f: torch.Tensor) -> None:
    # Seen items cover every interaction in the file, held-out ones too: the user has seen them.
    seen = Csr.build(data.user, data.item, data.weight, len(data.users))
    save_file(
        {
            "user_factors": users_f.detach().float().cpu().contiguous(),
            "item_factors": items_f.detach().float().cpu().contiguous(),
            "seen_indptr": torch.from_numpy(seen.indptr),
            "seen_indices": torch.from_numpy(seen.indices.astype(np.int32)),
        },
        built / FACTORS_FILE,
    )
    (built / USERS_FILE).write_text(json.dumps(data.users))
    (built / ITEMS_FILE).write_text(json.dumps(data.items))
    counts = np.bincount(data.item, minlength=len(data.items))
    ranked = np.argsort(-counts, kind="stable")
    popularity = {"items": [data.items[i] for i in ranked], "counts": counts[ranked].tolist()}
    (built / POPULARITY_FILE).write_text(json.dumps(popularity))
