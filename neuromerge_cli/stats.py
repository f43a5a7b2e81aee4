"""Whole-model statistics that methods need before merging, computed in streaming passes.

Each statistic sees every merged tensor's task vectors once per pass it asks for and keeps only
small summaries. The engine schedules them: a statistic with ``after`` runs its passes once that
one has finished.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .memory import release_free_memory
from .topk import StreamingTopK, kept_count, tensor_thresholds


class GlobalStat:
    """A streaming reduction over all merged tensors."""

    key: str = ""
    passes: int = 1
    after: "GlobalStat | None" = None
    rowwise: bool = False  # observe() may see blocks of a tensor's rows instead of whole tensors
    stored_inputs: bool = False  # the engine calls observe_stored() with the inputs as stored, not observe()

    def observe(self, pass_index: int, name: str, deltas: torch.Tensor, weights: torch.Tensor) -> None:
        raise NotImplementedError

    def observe_stored(self, pass_index: int, name: str, tensors: list[torch.Tensor], weights: torch.Tensor) -> None:
        """Like observe, from [θ0, θ_1..θ_T] in their storage dtype (on the CPU): a statistic that needs
        θ0, or that works task by task to hold less than T float32 task vectors at once."""
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
        self._tensor_thr: dict[str, torch.Tensor] = {}  # per-tensor thresholds seen in the statistics pass
        self.rowwise = self.passes == 0 or scope == "global"
        self.stored_inputs = self.passes == 1
        self.device = torch.device(device)

    def partials(self, pass_index: int) -> list[torch.Tensor] | None:
        if self._topk is not None:
            return self._topk.partials(pass_index)
        # per-tensor thresholds are cached for the merge pass, which may hand a rank other tensors (and
        # blocks of rows, whose threshold cannot be recomputed): every rank observes every tensor
        return None

    def observe(self, pass_index: int, name: str, deltas: torch.Tensor, weights: torch.Tensor) -> None:
        if self._topk is not None:
            mags = deltas.abs()
            (self._topk.observe_coarse if pass_index == 0 else self._topk.observe_fine)(mags)
            return
        self._observe_tensor(name, deltas.shape[0], lambda t: deltas[t].abs())

    def observe_stored(self, pass_index: int, name: str, tensors: list[torch.Tensor], weights: torch.Tensor) -> None:
        base = tensors[0].to(self.device)
        self._observe_tensor(name, len(tensors) - 1,
                             lambda t: tensors[t + 1].to(self.device, torch.float32, copy=True).sub_(base).abs_())

    def _observe_tensor(self, name: str, num_tasks: int, magnitudes: Callable[[int], torch.Tensor]) -> None:
        """Per-tensor thresholds, cached, and the sums behind σ_t, one task at a time: ``magnitudes(t)``
        is a fresh float32 |τ_t| of the tensor (consumed)."""
        thr = torch.empty(num_tasks, dtype=torch.float32)
        n = 0
        for t in range(num_tasks):
            mags = magnitudes(t).reshape(1, -1)
            n = mags.shape[1]
            thr[t] = tensor_thresholds(mags, self.density)[0]
            keep = mags >= thr[t].to(mags.device)
            self._total[t] += float(mags.sum(dtype=torch.float64))
            self._kept[t] += int(torch.count_nonzero(keep))
            self._removed[t] += float(mags.masked_fill_(keep, 0.0).sum(dtype=torch.float64))
            del mags, keep
        self._tensor_thr[name] = thr
        self._n += n
    def end_pass(self, pass_index: int) -> None:
        if self._topk is None:
            release_free_memory()  # the whole tensors' temporaries, before the merge pass
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


SignSum = Callable[[str, torch.Size, int, torch.Tensor, torch.Tensor, torch.Tensor], float]
"""(name, the tensor's shape, first row, θ0 rows (r, n) float32, τ rows (T, r, n) float32, weights) →
Σ over those rows of the elected signs sign(Σ_t w_t x_t) of the values x a method elects on."""

ROW_CHUNK_ELEMENTS = 1 << 20  # entries per task of one block of rows in TensorMajorityStat


Reader = Callable[[str, tuple[int, int]], list[torch.Tensor]]
"""(name, rows [start, stop)) → the block of those rows of [θ0, θ_1..θ_T] as stored, on the CPU."""


class TensorMajorityStat(GlobalStat):
    """Per tensor, the majority sign m = sign(Σ over the tensor of the elected signs), on demand.

    An election falls back to m where Σ_t w_t x_t = 0 exactly while some x_t ≠ 0, and the group is the
    tensor (per-tensor TIES, DARE-TIES, NeuroMerging's parallel coefficients). A block of rows that
    has such a tie asks for m; it is then found from the tensor's inputs, read again (``reader``, set
    by the engine with ``shapes``) in blocks of rows of about ROW_CHUNK_ELEMENTS entries, with
    ``sign_sum`` giving each block's Σ of signs (a sum of ±1 and 0: exact in float64), and cached.
    """

    key = "tensor_majority"
    passes = 0

    def __init__(self, sign_sum: SignSum, device: torch.device) -> None:
        self._sign_sum = sign_sum
        self.device = torch.device(device)
        self.reader: Reader | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._sums: dict[str, float] = {}

    def majority(self, name: str, weights: torch.Tensor) -> float:
        """m of tensor ``name`` (of ndim >= 1), read from its inputs the first time it is asked for."""
        if name not in self._sums:
            if self.reader is None:
                raise RuntimeError("TensorMajorityStat: no reader to find a tensor's majority sign")
            shape = torch.Size(self.shapes[name])
            per_row = shape[1:].numel()
            step = max(1, ROW_CHUNK_ELEMENTS // max(1, per_row))
            total = 0.0
            for r0 in range(0, shape[0], step):
                views = [t.reshape(t.shape[0], -1) for t in self.reader(name, (r0, min(shape[0], r0 + step)))]
                base = views[0].to(self.device, torch.float32)
                deltas = torch.stack([v.to(self.device, torch.float32) for v in views[1:]]).sub_(base)
                total += self._sign_sum(name, shape, r0, base, deltas, weights)
            self._sums[name] = total
            release_free_memory()
        total = self._sums[name]
        return float((total > 0) - (total < 0))

    def summary(self) -> dict[str, Any]:
        return {"tensors_read_again": len(self._sums)}  # blocks of these tensors had an exact tie


__all__ = ["GlobalStat", "TrimStat", "MajoritySignStat", "TensorMajorityStat", "kept_count"]
