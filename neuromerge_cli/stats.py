"""Whole-model statistics that methods need before merging, computed in streaming passes.

Each statistic sees every merged tensor's task vectors once per pass it asks for and keeps only
small summaries. The engine schedules them: a statistic with ``after`` runs its passes once that
one has finished.
"""

from __future__ import annotations

from typing import Any

import torch

from .topk import StreamingTopK, kept_count, tensor_thresholds


class GlobalStat:
    """A streaming reduction over all merged tensors."""

    key: str = ""
    passes: int = 1
    after: "GlobalStat | None" = None
    rowwise: bool = False  # observe() may see blocks of a tensor's rows instead of whole tensors

    def observe(self, pass_index: int, name: str, deltas: torch.Tensor, weights: torch.Tensor) -> None:
        raise NotImplementedError

    def end_pass(self, pass_index: int) -> None:
        """Called once every tensor has been observed in ``pass_index``."""

    def partials(self, pass_index: int) -> list[torch.Tensor] | None:
        """The accumulators of ``pass_index`` that add up across processes, summed in place between the
        last ``observe`` and ``end_pass`` when tensors are split across ranks (it may be called more
        than once; the last call's tensors count); None: every rank observes every tensor."""
        return None

    def summary(self) -> dict[str, Any]:
        return {}


class TrimStat(GlobalStat):
    """Top-k trim of every task vector: σ_t and, for the global scope, the exact thresholds.

    ``scope='global'``: one threshold per task over all merged tensors (two passes).
    ``scope='tensor'``: one threshold per task and tensor; one pass, for σ_t and kept fractions.
    """

    key = "trim"

    def __init__(self, density: float, scope: str, num_tasks: int, device: torch.device) -> None:
        self.density = density
        self.scope = scope
        self.num_tasks = num_tasks
        self.passes = 0 if density >= 1.0 else (2 if scope == "global" else 1)
        self._topk = StreamingTopK(num_tasks, density, device) if self.passes == 2 else None
        self._removed = torch.zeros(num_tasks, dtype=torch.float64)
        self._total = torch.zeros(num_tasks, dtype=torch.float64)
        self._kept = torch.zeros(num_tasks, dtype=torch.float64)
        self._n = 0
        self._n_box: torch.Tensor | None = None
        self._tensor_thr: dict[str, torch.Tensor] = {}  # per-tensor thresholds seen in the statistics pass
        self.rowwise = self.passes == 0 or scope == "global"

    def partials(self, pass_index: int) -> list[torch.Tensor] | None:
        if self._topk is not None:
            return self._topk.partials(pass_index)
        self._n_box = torch.tensor([self._n], dtype=torch.int64)
        return [self._removed, self._total, self._kept, self._n_box]

    def observe(self, pass_index: int, name: str, deltas: torch.Tensor, weights: torch.Tensor) -> None:
        mags = deltas.abs()
        if self._topk is not None:
            (self._topk.observe_coarse if pass_index == 0 else self._topk.observe_fine)(mags)
            return
        thr = tensor_thresholds(mags, self.density)
        self._tensor_thr[name] = thr.cpu()
        flat = mags.reshape(self.num_tasks, -1)
        keep = flat >= thr.unsqueeze(1)
        self._removed += torch.where(keep, 0.0, flat).double().sum(1).cpu()
        self._total += flat.double().sum(1).cpu()
        self._kept += keep.sum(1).double().cpu()
        self._n += flat.shape[1]

    def end_pass(self, pass_index: int) -> None:
        if self._topk is None:
            if self._n_box is not None:
                self._n, self._n_box = int(self._n_box.item()), None
            return
        if pass_index == 0:
            self._topk.end_coarse()
        else:
            self._topk.end_fine()
            self._removed = torch.tensor(self._topk.removed_l1, dtype=torch.float64)
            self._total = torch.tensor(self._topk.total_l1, dtype=torch.float64)
            self._kept = torch.tensor(self._topk.kept, dtype=torch.float64)
            self._n = self._topk.n

    @property
    def thresholds(self) -> torch.Tensor | None:
        """Global per-task thresholds (T,), or None when trimming is per tensor or off."""
        return None if self._topk is None else self._topk.thresholds

    def mask(self, deltas: torch.Tensor, name: str | None = None) -> torch.Tensor:
        """The trimmed task vectors m_t ∘ τ_t of one tensor (T, ...); with its ``name``, per-tensor
        thresholds already found in the statistics pass are reused."""
        if self.density >= 1.0:
            return deltas
        mags = deltas.abs()
        if self.scope == "global":
            thr = self.thresholds
        elif name is not None and name in self._tensor_thr:
            thr = self._tensor_thr[name]
        else:
            thr = tensor_thresholds(mags, self.density)
        thr = thr.to(deltas.device).reshape((-1,) + (1,) * (deltas.ndim - 1))
        # 1.0 where kept, times τ; + 0.0 turns the −0.0 of a trimmed negative entry into +0.0. On a CPU
        # this is three times faster than where() over a boolean mask (NaN entries, allowed only with
        # --allow-nonfinite, stay NaN).
        return mags.ge_(thr).mul_(deltas).add_(0.0)

    @property
    def sigma(self) -> list[float]:
        """σ_t = ‖τ_t − m_t∘τ_t‖₁ / ‖τ_t‖₁ per task (0 when τ_t = 0 or nothing is trimmed)."""
        return [float(r / t) if t > 0 else 0.0 for r, t in zip(self._removed.tolist(), self._total.tolist())]

    def summary(self) -> dict[str, Any]:
        n = self._n
        thr = self.thresholds
        return {
            "density": self.density,
            "mask_scope": self.scope,
            "entries_per_task": n,
            "threshold": None if thr is None else [float(x) for x in thr.tolist()],
            "kept_fraction": [float(k / n) if n else 1.0 for k in self._kept.tolist()] if self.passes else [1.0] * self.num_tasks,
            "sigma": self.sigma,
        }


class MajoritySignStat(GlobalStat):
    """sign(Σ over all coordinates of the elected sign) of the trimmed, weighted task vectors.

    TIES with a global mask falls back to this sign where a coordinate's sum is exactly zero.
    """

    key = "majority"
    passes = 1

    def __init__(self, trim: TrimStat) -> None:
        self.after = trim
        self._trim = trim
        self._sum = torch.zeros(1, dtype=torch.float64)  # a sum of signs: exact in float64
        self.rowwise = trim.rowwise

    def observe(self, pass_index: int, name: str, deltas: torch.Tensor, weights: torch.Tensor) -> None:
        w = weights.reshape((-1,) + (1,) * (deltas.ndim - 1))
        self._sum += torch.sign((self._trim.mask(deltas, name) * w).sum(0)).sum().double().cpu()

    def partials(self, pass_index: int) -> list[torch.Tensor] | None:
        return [self._sum]

    @property
    def sign(self) -> float:
        total = float(self._sum.item())
        return float((total > 0) - (total < 0))

    def summary(self) -> dict[str, Any]:
        return {"majority_sign": self.sign}


__all__ = ["GlobalStat", "TrimStat", "MajoritySignStat", "kept_count"]
