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

    def observe(self, pass_index: int, name: str, deltas: torch.Tensor, weights: torch.Tensor) -> None:
        raise NotImplementedError

    def end_pass(self, pass_index: int) -> None:
        """Called once every tensor has been observed in ``pass_index``."""

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

    def observe(self, pass_index: int, name: str, deltas: torch.Tensor, weights: torch.Tensor) -> None:
        mags = deltas.abs()
        if self._topk is not None:
            (self._topk.observe_coarse if pass_index == 0 else self._topk.observe_fine)(mags)
            return
        thr = tensor_thresholds(mags, self.density)
        flat = mags.reshape(self.num_tasks, -1)
        keep = flat >= thr.unsqueeze(1)
        self._removed += torch.where(keep, 0.0, flat).double().sum(1).cpu()
        self._total += flat.double().sum(1).cpu()
        self._kept += keep.sum(1).double().cpu()
        self._n += flat.shape[1]

    def end_pass(self, pass_index: int) -> None:
        if self._topk is None:
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

    def mask(self, deltas: torch.Tensor) -> torch.Tensor:
        """The trimmed task vectors m_t ∘ τ_t of one tensor (T, ...)."""
        if self.density >= 1.0:
            return deltas
        mags = deltas.abs()
        thr = self.thresholds if self.scope == "global" else tensor_thresholds(mags, self.density)
        thr = thr.to(deltas.device).reshape((-1,) + (1,) * (deltas.ndim - 1))
        return torch.where(mags >= thr, deltas, torch.zeros((), dtype=deltas.dtype, device=deltas.device))

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
        self._sum = 0.0

    def observe(self, pass_index: int, name: str, deltas: torch.Tensor, weights: torch.Tensor) -> None:
        w = weights.reshape((-1,) + (1,) * (deltas.ndim - 1))
        self._sum += float(torch.sign((self._trim.mask(deltas) * w).sum(0)).sum())

    @property
    def sign(self) -> float:
        return float((self._sum > 0) - (self._sum < 0))

    def summary(self) -> dict[str, Any]:
        return {"majority_sign": self.sign}


__all__ = ["GlobalStat", "TrimStat", "MajoritySignStat", "kept_count"]
