"""Matrix factorization trainers on torch: BPR (sampled negatives, minibatch Adam) and
implicit ALS (confidence-weighted, closed-form alternating solves).

Both score a (user, item) pair as the dot product of ``factors()``: BPR's item bias is folded
in as one extra column (1 on the user side), so serving is a single matrix product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from workers.training.loop import Pacer

INIT_STD: Final = 0.1
# Implicit ALS confidence c = 1 + ALS_ALPHA * log1p(weight): log damps heavy-tailed counts
# (retail quantities run into the thousands) while ratings 1-5 still rank above plain presence.
ALS_ALPHA: Final = 10.0
# Bounds the padded (rows x longest row x factors) block an ALS solve step builds.
ALS_BLOCK_FLOATS: Final = 1 << 22


@dataclass(frozen=True)
class Csr:
    """Rows of a sparse matrix: row r holds ``indices[indptr[r]:indptr[r+1]]``."""

    indptr: np.ndarray  # int64, rows + 1
    indices: np.ndarray  # int64
    values: np.ndarray  # float32

    @classmethod
    def build(cls, rows: np.ndarray, cols: np.ndarray, values: np.ndarray, n_rows: int) -> Csr:
        order = np.argsort(rows, kind="stable")
        indptr = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
        return cls(indptr, cols[order].astype(np.int64), values[order].astype(np.float32))

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.indptr)


@dataclass(frozen=True)
class TrainSet:
    n_users: int
    n_items: int
    user: np.ndarray  # int64 per training pair
    item: np.ndarray
    weight: np.ndarray  # float32

    @property
    def size(self) -> int:
        return len(self.user)

    def by_user(self) -> Csr:
        return Csr.build(self.user, self.item, self.weight, self.n_users)

    def by_item(self) -> Csr:
        return Csr.build(self.item, self.user, self.weight, self.n_items)


class FactorTrainer(Protocol):
    """One matrix-factorization method, epoch by epoch (BPR, ALS); not to be confused with
    ``workers.training.loop.Trainer``, a whole training job."""

    steps: int  # steps per epoch, as progress reports them

    def run_epoch(self, epoch: int, pacer: Pacer) -> float: ...

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]: ...


class BprTrainer:
    def __init__(
        self, data: TrainSet, factors: int, lr: float, reg: float, batch_size: int, seed: int, device: torch.device
    ) -> None:
        self.data = data
        self.reg = reg
        self.batch_size = batch_size
        self.device = device
        self.steps = math.ceil(data.size / batch_size)
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.user_emb = (
            torch.randn(data.n_users, factors, generator=self.gen, device=device) * INIT_STD
        ).requires_grad_()
        self.item_emb = (
            torch.randn(data.n_items, factors, generator=self.gen, device=device) * INIT_STD
        ).requires_grad_()
        self.item_bias = torch.zeros(data.n_items, device=device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.user_emb, self.item_emb, self.item_bias], lr=lr)
        self._user = torch.from_numpy(data.user).to(device)
        self._item = torch.from_numpy(data.item).to(device)

    def run_epoch(self, epoch: int, pacer: Pacer) -> float:
        order = torch.randperm(self.data.size, generator=self.gen, device=self.device)
        total = torch.zeros((), device=self.device)  # summed on the device: no sync per step
        for step, start in enumerate(range(0, self.data.size, self.batch_size), start=1):
            idx = order[start : start + self.batch_size]
            u, i = self._user[idx], self._item[idx]
            # Uniform negatives: a sampled positive is rare in sparse data and only adds noise.
            j = torch.randint(0, self.data.n_items, (len(idx),), generator=self.gen, device=self.device)
            pu, qi, qj = self.user_emb[u], self.item_emb[i], self.item_emb[j]
            margin = (pu * (qi - qj)).sum(1) + self.item_bias[i] - self.item_bias[j]
            penalty = (pu.square().sum(1) + qi.square().sum(1) + qj.square().sum(1)).mean()
            loss = -F.logsigmoid(margin).mean() + self.reg * penalty
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.detach() * len(idx)
            pacer.step(epoch, step, len(idx), None)
        return float(total) / self.data.size

    def state(self) -> dict[str, Any]:
        return {
            "user_emb": self.user_emb.detach().cpu(),
            "item_emb": self.item_emb.detach().cpu(),
            "item_bias": self.item_bias.detach().cpu(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.gen.get_state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.user_emb.copy_(state["user_emb"])
            self.item_emb.copy_(state["item_emb"])
            self.item_bias.copy_(state["item_bias"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.gen.set_state(state["generator"])

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        users = torch.cat([self.user_emb.detach(), torch.ones(self.data.n_users, 1, device=self.device)], 1)
        items = torch.cat([self.item_emb.detach(), self.item_bias.detach()[:, None]], 1)
        return users, items


class AlsTrainer:
    def __init__(self, data: TrainSet, factors: int, reg: float, seed: int, device: torch.device) -> None:
        self.reg = reg
        self.device = device
        self.nnz = data.size
        gen = torch.Generator(device=device).manual_seed(seed)
        self.user_f = torch.randn(data.n_users, factors, generator=gen, device=device) * INIT_STD
        self.item_f = torch.randn(data.n_items, factors, generator=gen, device=device) * INIT_STD
        self._by_user = _SolvePlan(data.by_user(), factors, device)
        self._by_item = _SolvePlan(data.by_item(), factors, device)
        self.steps = len(self._by_user.blocks) + len(self._by_item.blocks)

    def run_epoch(self, epoch: int, pacer: Pacer) -> float:
        self.user_f = self._by_user.solve(self.item_f, self.reg, epoch, pacer, first_step=1)
        self.item_f = self._by_item.solve(self.user_f, self.reg, epoch, pacer, first_step=len(self._by_user.blocks) + 1)
        return self._loss()

    def _loss(self) -> float:
        """Weighted squared error over all pairs plus the penalty, per training pair.

        Unobserved pairs (confidence 1, target 0) sum to trace(XᵀX·YᵀY) without forming X·Yᵀ;
        observed pairs then replace their s² term with c·(1 - s)².
        """
        plan = self._by_user
        s = (self.user_f[plan.rows] * self.item_f[plan.cols]).sum(1)
        observed = (plan.conf * (1 - s).square() - s.square()).sum()
        unobserved = ((self.user_f.T @ self.user_f) * (self.item_f.T @ self.item_f)).sum()
        penalty = self.reg * (self.user_f.square().sum() + self.item_f.square().sum())
        return float(observed + unobserved + penalty) / self.nnz

    def state(self) -> dict[str, Any]:
        return {"user_f": self.user_f.cpu(), "item_f": self.item_f.cpu()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.user_f = state["user_f"].to(self.device)
        self.item_f = state["item_f"].to(self.device)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_f, self.item_f


class _SolvePlan:
    """The rows of one side of the matrix, grouped into blocks of similar length for batched solves.

    Row r's factors solve (FᵀF + Fᵣᵀ(Cᵣ - I)Fᵣ + λI) x = Fᵣᵀ Cᵣ 1 (Hu, Koren and Volinsky 2008),
    where Fᵣ holds the other side's factors of the row's observed entries. Rows sorted by
    length and padded per block keep the padding small and every block one batched solve.
    """

    def __init__(self, csr: Csr, factors: int, device: torch.device) -> None:
        counts = csr.counts
        self.n_rows = len(counts)
        self.rows = torch.from_numpy(np.repeat(np.arange(self.n_rows), counts)).to(device)
        self.cols = torch.from_numpy(csr.indices).to(device)
        self.conf = (1.0 + ALS_ALPHA * torch.log1p(torch.from_numpy(csr.values))).to(device)
        self.blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = []
        order = np.argsort(counts, kind="stable")
        lengths = np.maximum(counts[order], 1)
        start = 0
        while start < len(order):
            # Ascending lengths: a block's padded size is its row count times its last row's length.
            padded = np.arange(1, len(order) - start + 1) * lengths[start:] * factors
            size = int(np.count_nonzero(padded <= ALS_BLOCK_FLOATS))
            size = max(1, min(size, ALS_BLOCK_FLOATS // (factors * factors)))
            block = order[start : start + size]
            longest = int(lengths[start + size - 1])
            # (rows, longest) index grid into the entry arrays, -1 where a row is shorter
            offsets = np.arange(longest)[None, :]
            valid = offsets < counts[block][:, None]
            entry = np.where(valid, csr.indptr[block][:, None] + offsets, -1)
            self.blocks.append(
                (
                    torch.from_numpy(block).to(device),
                    torch.from_numpy(entry).to(device),
                    torch.from_numpy(valid).to(device),
                    int(counts[block].sum()),
                )
            )
            start += size

    def solve(self, other: torch.Tensor, reg: float, epoch: int, pacer: Pacer, first_step: int) -> torch.Tensor:
        f = other.shape[1]
        gram = other.T @ other + reg * torch.eye(f, device=other.device)
        out = torch.zeros(self.n_rows, f, device=other.device)
        for n, (block, entry, valid, entries) in enumerate(self.blocks):
            safe = entry.clamp(min=0)
            conf = torch.where(valid, self.conf[safe], 0.0)  # padding gets confidence 0: no effect
            vecs = other[self.cols[safe]]  # (rows, longest, f)
            weighted = vecs * (conf - valid.float()).unsqueeze(2)  # (c - 1) on observed entries
            a = gram + weighted.transpose(1, 2) @ vecs
            b = (vecs * conf.unsqueeze(2)).sum(1, keepdim=True).transpose(1, 2)
            out[block] = torch.linalg.solve(a, b).squeeze(2)
            pacer.step(epoch, first_step + n, entries, None)
        return out
