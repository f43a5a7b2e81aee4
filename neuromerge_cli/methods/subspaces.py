"""Neuronal subspaces: split each neuron's task vectors along its base row, merge the orthogonal parts.

A neuron is one row w0 of a weight reshaped to (out, −1). Each task row τ_t splits into a parallel
part a_t·w0 (a_t = ⟨τ_t, w0⟩/⟨w0, w0⟩, 0 when w0 = 0) and an orthogonal part p_t = τ_t − a_t·w0.

The orthogonal merge needs, per row, an orthonormal basis V of the row space of P = [p_1; …; p_T]
and the coordinates C = P V. Instead of one SVD per row, every row of a chunk is handled at once
from its T×T Gram matrix G = P Pᵀ = U Λ Uᵀ (batched eigh, float64): V = Pᵀ U Λ^{-1/2} and
C = G U Λ^{-1/2} (= U Λ^{1/2}; written as G U so that a task whose row is exactly zero gets exactly
zero coordinates). V is never formed: τ̄⊥ = V c̄ = Pᵀ y with y = U Λ^{-1/2} c̄.

Numerical conventions (the SPEC leaves "non-negligible" open; the tests' reference uses the same):
- scale of a row: s = ‖[τ_1; …; τ_T]‖_F, the size of its (masked) task rows;
- rank: directions with σ_j > RANK_RTOL·s (σ² = eigenvalues of G), so an orthogonal part that is
  only the rounding left by subtracting the parallel part (e.g. rows of width 1) has rank 0;
- coordinates with |c_tj| <= COORD_RTOL·s count as exactly zero (they are rounding noise of
  coordinates that are zero by geometry, e.g. disjoint task supports, and would otherwise change
  the count of an elect_mean);
- an elect_* tie in a direction (|Σ_t w_t c_tj| <= TIE_RTOL·Σ_t |w_t c_tj|) gives 0 there, not the
  neuron's majority sign: a basis vector's sign is arbitrary, so a majority over directions would
  make the result depend on it; the tolerance keeps rounding from deciding a tie's sign.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .elect import merge_values

RANK_RTOL = 1e-6
COORD_RTOL = 1e-9
TIE_RTOL = 1e-9
# float64 elements of one chunk's P: on a CPU a block that stays in cache (8 MiB) is fastest; on a
# GPU large blocks (256 MiB) amortise the kernel launches.
CPU_CHUNK_ELEMENTS = 1 << 20
CUDA_CHUNK_ELEMENTS = 1 << 25


def chunk_budget(device: torch.device) -> int:
    return CPU_CHUNK_ELEMENTS if device.type == "cpu" else CUDA_CHUNK_ELEMENTS


def as_rows(x: torch.Tensor, leading: int = 0) -> torch.Tensor:
    """View a tensor as rows: (*lead, out, −1), keeping ``leading`` leading dims (e.g. the task axis)."""
    return x.reshape(*x.shape[: leading + 1], -1)


def row_chunks(out: int, tasks: int, width: int, budget: int) -> list[tuple[int, int]]:
    """Row ranges whose (rows, T, d) float64 blocks hold about ``budget`` elements."""
    step = max(1, budget // max(1, tasks * width))
    return [(r, min(out, r + step)) for r in range(0, out, step)]


def _chunk_buffer(chunks: list[tuple[int, int]], tau: torch.Tensor) -> torch.Tensor:
    rows = max((r1 - r0 for r0, r1 in chunks), default=0)
    return torch.empty((rows, tau.shape[0], tau.shape[2]), dtype=torch.float64, device=tau.device)


def _decompose(base: torch.Tensor, tau: torch.Tensor, buffer: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a (rows, T), P (rows, T, d), w0 (rows, d), ‖w0‖² (rows,)), float64, for base rows (rows, d)
    and task rows τ (T, rows, d). P is written into ``buffer`` (reused across chunks: a fresh
    large allocation per chunk costs page faults that show on a CPU)."""
    w0 = base.to(torch.float64)
    p = buffer[: base.shape[0]].copy_(tau.transpose(0, 1))
    norm2 = (w0 * w0).sum(1)
    dots = torch.bmm(p, w0.unsqueeze(2)).squeeze(2)
    a = torch.where(norm2.unsqueeze(1) > 0, dots / norm2.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(1), 0.0)
    p.baddbmm_(a.unsqueeze(2), w0.unsqueeze(1), alpha=-1.0)
    return a, p, w0, norm2


def split_parts(base: torch.Tensor, tau: torch.Tensor, budget: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The parallel parts a_t·w0 and the orthogonal parts p_t of task rows τ (T, out, d), float32."""
    budget = budget or chunk_budget(base.device)
    parallel = torch.empty_like(tau, dtype=torch.float32)
    orthogonal = torch.empty_like(tau, dtype=torch.float32)
    chunks = row_chunks(base.shape[0], tau.shape[0], base.shape[1], budget)
    buffer = _chunk_buffer(chunks, tau)
    for r0, r1 in chunks:
        a, p, w0, _ = _decompose(base[r0:r1], tau[:, r0:r1], buffer)
        parallel[:, r0:r1] = (a.T.unsqueeze(2) * w0.unsqueeze(0)).float()
        orthogonal[:, r0:r1] = p.permute(1, 0, 2).float()
    return parallel, orthogonal


@dataclass
class OrthogonalChunk:
    """The orthogonal merge of a block of rows."""

    merged: torch.Tensor  # τ̄⊥ (rows, d), float64
    rank: torch.Tensor  # (rows,) orthogonal rank r
    conflicts: torch.Tensor  # () directions whose non-zero coordinates disagree in sign
    energy: torch.Tensor  # (T,) Σ_rows ‖p_t‖²


def orthogonal_merge(p: torch.Tensor, weights: torch.Tensor, merge_fn: str,
                     parallel_energy: torch.Tensor | None = None) -> OrthogonalChunk:
    """ψ over tasks in the SVD basis of each row's orthogonal parts ``p`` (rows, T, d), float64.

    ``parallel_energy`` (rows,): Σ_t ‖a_t·w0‖², which with ‖P‖² makes the row's scale s² (0 if None).
    """
    gram = torch.bmm(p, p.transpose(1, 2))
    lam, u = torch.linalg.eigh(gram)  # ascending
    scale2 = torch.diagonal(gram, dim1=1, dim2=2).sum(1, keepdim=True)
    if parallel_energy is not None:
        scale2 = scale2 + parallel_energy.unsqueeze(1)
    keep = lam > (RANK_RTOL**2) * scale2
    inv_sqrt = torch.where(keep, lam.clamp_min(torch.finfo(lam.dtype).tiny).rsqrt(), 0.0)
    coords = torch.bmm(gram, u) * inv_sqrt.unsqueeze(1)  # (rows, T, T): task t, direction j
    coords = torch.where(coords.abs() > COORD_RTOL * scale2.sqrt().unsqueeze(2), coords, 0.0)
    values = coords.permute(1, 0, 2)  # (T, rows, directions)
    if merge_fn.startswith("elect"):
        weighted = values * weights.to(values.dtype).reshape(-1, 1, 1)
        tie = weighted.sum(0).abs() <= TIE_RTOL * weighted.abs().sum(0)
        values = torch.where(tie, 0.0, values)
    merged_coords = merge_values(values, weights.to(values.dtype), merge_fn, majority=0.0)
    y = torch.bmm(u, (merged_coords * inv_sqrt).unsqueeze(2))  # (rows, T, 1)
    merged = torch.bmm(y.transpose(1, 2), p).squeeze(1)
    conflict = (values > 0).any(0) & (values < 0).any(0) & keep
    return OrthogonalChunk(merged, keep.sum(1), conflict.sum(),
                           torch.diagonal(gram, dim1=1, dim2=2).sum(0))


@dataclass
class NeuronMerge:
    """Unscaled merged parts of one neuron tensor and its statistics."""

    parallel: torch.Tensor  # τ̄∥ (out, d) float32
    orthogonal: torch.Tensor  # τ̄⊥ (out, d) float32
    stats: dict[str, Any] = field(default_factory=dict)


def neuron_merge(base: torch.Tensor, tau: torch.Tensor, weights: torch.Tensor, merge_fn: str,
                 budget: int | None = None) -> NeuronMerge:
    """NeuroMerging's neuron step for base rows (out, d) and (masked) task rows τ (T, out, d).

    τ̄∥ = ψ_t(a_t)·w0 with the elections over the tensor's rows; τ̄⊥ = V ψ_t(C) per row. Rows are
    processed in blocks of about ``budget`` float64 elements (rows·T·d).
    """
    budget = budget or chunk_budget(base.device)
    out, width = base.shape
    num_tasks = tau.shape[0]
    coeffs = torch.empty((num_tasks, out), dtype=torch.float64, device=base.device)
    orthogonal = torch.empty((out, width), dtype=torch.float32, device=base.device)
    rank = torch.empty(out, dtype=torch.int64, device=base.device)
    orth_energy = torch.zeros(num_tasks, dtype=torch.float64, device=base.device)
    base_norm2 = torch.empty(out, dtype=torch.float64, device=base.device)
    conflicts = torch.zeros((), dtype=torch.int64, device=base.device)
    chunks = row_chunks(out, num_tasks, width, budget)
    buffer = _chunk_buffer(chunks, tau)
    for r0, r1 in chunks:
        a, p, _, norm2 = _decompose(base[r0:r1], tau[:, r0:r1], buffer)
        coeffs[:, r0:r1] = a.T
        base_norm2[r0:r1] = norm2
        chunk = orthogonal_merge(p, weights, merge_fn, (a * a * norm2.unsqueeze(1)).sum(1))
        orthogonal[r0:r1] = chunk.merged.float()
        rank[r0:r1] = chunk.rank
        conflicts += chunk.conflicts
        orth_energy += chunk.energy
    merged_a = merge_values(coeffs, weights.to(torch.float64), merge_fn)
    parallel = (merged_a.unsqueeze(1) * base.to(torch.float64)).float()
    par_conflicts = int(((coeffs > 0).any(0) & (coeffs < 0).any(0)).sum())
    orth_conflicts, elections_orth = int(conflicts), int(rank.sum())
    par_energy = (coeffs * coeffs * base_norm2).sum(1)
    total = par_energy + orth_energy
    share = lambda e: [float(x / t) if t > 0 else 0.0 for x, t in zip(e.tolist(), total.tolist())]  # noqa: E731
    stats = {
        "parallel_share": share(par_energy),
        "orthogonal_share": share(orth_energy),
        "mean_orthogonal_rank": float(rank.double().mean()) if out else 0.0,
        "sign_conflict": (par_conflicts + orth_conflicts) / (out + elections_orth) if out else 0.0,
        "sign_conflict_parallel": par_conflicts / out if out else 0.0,
        "sign_conflict_orthogonal": orth_conflicts / elections_orth if elections_orth else 0.0,
        "parallel_norm": float(parallel.norm()),
        "orthogonal_norm": float(orthogonal.norm()),
    }
    return NeuronMerge(parallel, orthogonal, stats)
