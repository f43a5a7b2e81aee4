"""Fused CPU kernels (the C extension ``_kernels``) for the engine's hottest sweeps, where they apply.

A kernel does in one read of its inputs what takes several eager torch passes, with the same float32
operations in the same order: the same task vectors, merged weights and counts, bit for bit (float64
sums differ in their last digits: another summation order). Callers keep the torch operations for
what a kernel does not take (CUDA, float16 inputs, non-contiguous views) and for installs where the
extension could not be built. NEUROMERGE_KERNELS=0 turns the kernels off, e.g. to compare the paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:
    from . import _kernels
except ImportError:  # built without a C compiler: the torch operations do the work
    _kernels = None

ENABLED = _kernels is not None and os.environ.get("NEUROMERGE_KERNELS", "1") != "0"
KINDS = {torch.float32: 0, torch.bfloat16: 1}
MAX_TASKS = 256  # _kernels.c's MAX_TASKS


def threads() -> int:
    """Threads a kernel may split its work over: torch's intra-op threads (``torch.set_num_threads``)."""
    return torch.get_num_threads()


def applies(tensors: list[torch.Tensor], device: torch.device) -> bool:
    """Whether the kernels take [θ0, θ_1..θ_T] as stored, for float32 results on ``device``."""
    first = tensors[0]
    return (ENABLED and device.type == "cpu" and first.dtype in KINDS and len(tensors) <= MAX_TASKS + 1
            and all(t.device.type == "cpu" and t.dtype == first.dtype and t.shape == first.shape
                    and t.is_contiguous() for t in tensors))


def takes(x: torch.Tensor) -> bool:
    """Whether the kernels over float32 values (count_around, capped_sums, magnitude_*) take ``x``:
    float32, contiguous, on the CPU."""
    return ENABLED and x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()


def count_around(x: torch.Tensor, value: float) -> tuple[int, int]:
    """(entries of ``x`` below ``value``, entries equal to it) in one read (``takes`` must hold)."""
    assert _kernels is not None
    return _kernels.count_around(x.data_ptr(), x.numel(), value)


def capped_sums(x: torch.Tensor, cap: float) -> tuple[float, float]:
    """(Σ x, Σ min(x, cap)) in float64 in one read (``takes`` must hold)."""
    assert _kernels is not None
    return _kernels.capped_sums(x.data_ptr(), x.numel(), cap)


def magnitude_histogram(rows: torch.Tensor, counts: torch.Tensor, l1: torch.Tensor) -> None:
    """For each row x_t of ``rows`` (T, n): add to ``counts`` (T · 2^16 int64) the count of each value of
    the high 16 bits of |x|'s float32 bits (topk.magnitude_bits >> 16), and Σ|x| to ``l1`` (T float64):
    one read (``takes`` must hold for ``rows``, and both accumulators be contiguous on the CPU)."""
    assert _kernels is not None and counts.dtype == torch.int64 and l1.dtype == torch.float64
    assert counts.is_contiguous() and l1.is_contiguous() and counts.numel() == rows.shape[0] << 16
    _kernels.magnitude_histogram(rows.data_ptr(), rows.shape[0], rows.shape[1], counts.data_ptr(), l1.data_ptr())


def magnitude_fine(rows: torch.Tensor, bins: torch.Tensor, fine: torch.Tensor, below: torch.Tensor) -> None:
    """For each row x_t of ``rows`` (T, n): where the high 16 bits of |x|'s float32 bits equal ``bins[t]``,
    add one to ``fine`` (T · 2^16 int64) at t · 2^16 + the low 16 bits; where they are below it, add |x|
    to ``below`` (T float64). One read (``takes`` must hold for ``rows``; accumulators contiguous, CPU)."""
    assert _kernels is not None and fine.dtype == bins.dtype == torch.int64 and below.dtype == torch.float64
    assert fine.is_contiguous() and below.is_contiguous() and fine.numel() == rows.shape[0] << 16
    b = bins.contiguous()
    _kernels.magnitude_fine(rows.data_ptr(), rows.shape[0], rows.shape[1], b.data_ptr(), fine.data_ptr(),
                            below.data_ptr())


def task_vectors_and_norms(tensors: list[torch.Tensor]
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(θ0, τ stacked (T, ...), ‖τ_t‖₁, ‖τ_t‖₂) of [θ0, θ_1..θ_T] as stored (``applies`` must hold):
    θ0 and τ_t = θ_t − θ0 in float32, the norms in float64, from one read of the inputs."""
    base = torch.empty(tensors[0].shape, dtype=torch.float32)
    deltas, l1, l2sq = _sweep(tensors, base, absolute=False)
    return base, deltas, l1, l2sq.sqrt_()


def abs_difference(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|x − base| in float32 of two tensors as stored (``applies`` must hold for [base, x])."""
    return _sweep([base, x], None, absolute=True)[0][0]


@dataclass
class Merged:
    """What kernels.merge returns for one piece."""

    out: torch.Tensor  # θ0 + delta, in the output dtype
    l1: torch.Tensor  # ‖τ_t‖₁ per task (float64)
    l2: torch.Tensor  # ‖τ_t‖₂ per task (float64)
    delta_norm: float  # ‖delta‖₂
    sign_total: int  # Σ of the elected signs before ties are filled (elect_* only)
    conflicts: int  # entries whose (trimmed) task values disagree in sign (with ``conflicts``)
    ties: torch.Tensor  # flat positions where an election's sum is 0 while a value is not (with ``ties``)


MERGE_FUNCTIONS = ("sum", "mean", "elect_sum", "elect_mean")  # the kernel's codes, in order


def merge(tensors: list[torch.Tensor], weights: torch.Tensor, merge_fn: str, dtype: torch.dtype, scale: float = 1.0,
          thresholds: torch.Tensor | None = None, majority: float = 0.0, conflicts: bool = False,
          ties: bool = False, drops: list[torch.Tensor] | None = None, keep: float = 1.0,
          write: bool = True) -> Merged:
    """θ0 + delta in ``dtype`` of [θ0, θ_1..θ_T] as stored (``applies`` must hold, ``dtype`` in KINDS), from
    one read of the inputs without making the task vectors, bit for bit the torch path's float32
    operations: the task vectors dropped where the bool masks ``drops`` (one per task, flat) are False
    and rescaled by 1/``keep`` as methods.common.dare_drop does (None: no drop), trimmed at
    ``thresholds`` (T,) as stats.TrimStat.mask does (None: no trim), ψ = ``merge_fn`` of them with
    ``weights`` (elect.merge_values, elections falling back to ``majority`` where a sum is 0),
    delta = ψ · ``scale``. Also the task vectors' norms, ‖delta‖, and
    what elections and ``conflicts`` (elect.sign_conflict_rate) need; ``ties``: keep the tie positions;
    not ``write``: the sums only (``out`` is empty)."""
    assert _kernels is not None
    base, tasks = tensors[0], tensors[1:]
    w = weights.to(torch.float32).contiguous()
    thr = None if thresholds is None else thresholds.to(torch.float32).contiguous()
    out = torch.empty(base.shape if write else (0,), dtype=dtype)
    l1 = torch.empty(len(tasks), dtype=torch.float64)
    l2sq = torch.empty(len(tasks), dtype=torch.float64)
    positions = torch.empty(base.numel() if ties else 0, dtype=torch.int64)
    masks = () if drops is None else tuple(d.reshape(-1).contiguous().view(torch.uint8) for d in drops)
    assert all(m.numel() == base.numel() for m in masks)
    delta_sq, sign_total, conflict_count, tie_count = _kernels.merge(
        KINDS[base.dtype], KINDS[dtype], base.data_ptr(), tuple(t.data_ptr() for t in tasks), base.numel(),
        w.data_ptr(), 0 if thr is None else thr.data_ptr(), MERGE_FUNCTIONS.index(merge_fn), float(w.sum()),
        majority, scale, conflicts, tuple(m.data_ptr() for m in masks), keep, out.data_ptr() if write else 0,
        l1.data_ptr(),
        l2sq.data_ptr(), positions.data_ptr() if ties else 0, threads())
    return Merged(out, l1, l2sq.sqrt_(), delta_sq ** 0.5, sign_total, conflict_count,
                  positions[:tie_count].clone())


def _sweep(tensors: list[torch.Tensor], base_out: torch.Tensor | None, absolute: bool
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel: τ_t (|τ_t| when ``absolute``) stacked, Σ|τ_t| and Σ τ_t², θ0 in float32 into ``base_out``."""
    assert _kernels is not None
    base, tasks = tensors[0], tensors[1:]
    out = torch.empty((len(tasks), *base.shape), dtype=torch.float32)
    l1 = torch.empty(len(tasks), dtype=torch.float64)
    l2sq = torch.empty(len(tasks), dtype=torch.float64)
    _kernels.task_vectors(KINDS[base.dtype], base.data_ptr(), tuple(t.data_ptr() for t in tasks), base.numel(),
                          out.data_ptr(), 0 if base_out is None else base_out.data_ptr(), l1.data_ptr(),
                          l2sq.data_ptr(), absolute, threads())
    return out, l1, l2sq
