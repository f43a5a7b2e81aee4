"""Neuronal subspaces: split each neuron's task vectors along its base row, merge the orthogonal parts.

A neuron is one row w0 of a weight reshaped to (out, −1). Each task row τ_t splits into a parallel
part a_t·w0 (a_t = ⟨τ_t, w0⟩/⟨w0, w0⟩, 0 when w0 = 0) and an orthogonal part p_t = τ_t − a_t·w0.

The orthogonal merge needs, per row, an orthonormal basis V of the row space of P = [p_1; …; p_T]
and the coordinates C = P V. Instead of one SVD per row, every row of a chunk is handled at once
from its T×T Gram matrix G = P Pᵀ = U Λ Uᵀ (batched eigh, float64): V = Pᵀ U Λ^{-1/2} and
C = G U Λ^{-1/2} (= U Λ^{1/2}; written as G U so that a task whose row is exactly zero gets exactly
zero coordinates). V is never formed: τ̄⊥ = V c̄ = Pᵀ y with y = U Λ^{-1/2} c̄. Nor is P: one Gram
matrix of Q = [τ_1; …; τ_T; w0] per row gives ⟨τ_s, τ_t⟩, ⟨τ_t, w0⟩ and ‖w0‖², hence a_t and
G = P Pᵀ, and τ̄⊥ = Σ_t y_t p_t = Qᵀ [y; −Σ_t y_t a_t]. A block of rows is copied once into a
float64 Q (a buffer reused across blocks) and read twice (Gram, result), so the kernel is a few
streaming passes plus T×T work per row. On a CPU with the fused kernels Q is never made: the two
passes are kernels.neuron_gram and kernels.neuron_output over the stored inputs (fused_neurons).

Numerical conventions (the SPEC leaves "non-negligible" open; the tests' reference uses the same):
- scale of a row: s = ‖[τ_1; …; τ_T]‖_F, the size of its (masked) task rows;
- rank: directions with σ_j > RANK_RTOL·s (σ² = eigenvalues of G), so an orthogonal part that is
  only the rounding left by subtracting the parallel part (e.g. rows of width 1) has rank 0;
- coordinates with |c_tj| <= COORD_RTOL·s count as exactly zero (they are rounding noise of
  coordinates that are zero by geometry, e.g. disjoint task supports, and would otherwise change
  the count of an elect_mean);
- an elect_* tie in a direction (|Σ_t w_t c_tj| <= TIE_RTOL·Σ_t |w_t c_tj|) gives 0 there, not the
  neuron's majority sign: a basis vector's sign is arbitrary, so a majority over directions would
  make the result depend on it; the tolerance keeps rounding from deciding a tie's sign;
- equal singular values leave the basis of their plane free, and elect_* depend on it: the basis
  is then the one eigh returns (mean and sum never depend on the basis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import kernels
from ..chunking import chunk_size
from ..cpu_threads import one_cpu_thread
from ..figures import Norm, Ratio
from .base import NeuronFusion
from .elect import Majority, elected_sign_sum, merge_values

RANK_RTOL = 1e-6
COORD_RTOL = 1e-9
TIE_RTOL = 1e-9
# float64 elements of one block of rows (rows·(T+1)·d): on a CPU a block that stays in cache (8 MiB) is fastest; on a
# GPU large blocks amortise the kernel launches (chunking).
CPU_CHUNK_ELEMENTS = 1 << 20


def chunk_budget(device: torch.device) -> int:
    return chunk_size(CPU_CHUNK_ELEMENTS, device)


def as_rows(x: torch.Tensor, leading: int = 0) -> torch.Tensor:
    """View a tensor as rows: (*lead, out, −1), keeping ``leading`` leading dims (e.g. the task axis)."""
    return x.reshape(*x.shape[: leading + 1], math.prod(x.shape[leading + 1:]))  # (-1 is ambiguous with no rows)


def row_chunks(out: int, tasks: int, width: int, budget: int) -> list[tuple[int, int]]:
    """Row ranges whose (rows, tasks, width) blocks hold about ``budget`` elements."""
    step = max(1, budget // max(1, tasks * width))
    return [(r, min(out, r + step)) for r in range(0, out, step)]


def split_parts(base: torch.Tensor, tau: torch.Tensor, budget: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The parallel parts a_t·w0 and the orthogonal parts p_t of task rows τ (T, out, d), float32."""
    budget = budget or chunk_budget(base.device)
    parallel = torch.empty_like(tau, dtype=torch.float32)
    orthogonal = torch.empty_like(tau, dtype=torch.float32)
    for r0, r1 in row_chunks(base.shape[0], tau.shape[0], base.shape[1], budget):
        w0 = base[r0:r1].double()
        t = tau[:, r0:r1].double()
        norm2 = (w0 * w0).sum(1)
        a = torch.where(norm2 > 0, (t * w0).sum(2) / norm2.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
        along = a.unsqueeze(2) * w0
        parallel[:, r0:r1] = along
        orthogonal[:, r0:r1] = t - along
    return parallel, orthogonal


@dataclass
class OrthogonalChunk:
    """The orthogonal merge of a block of rows, as coefficients on the task rows: τ̄⊥ = Σ_t y_t p_t."""

    y: torch.Tensor  # (rows, T)
    rank: torch.Tensor  # (rows,) orthogonal rank r
    conflicts: torch.Tensor  # () directions whose non-zero coordinates disagree in sign


def orthogonal_coefficients(gram: torch.Tensor, scale2: torch.Tensor, weights: torch.Tensor,
                            merge_fn: str) -> OrthogonalChunk:
    """ψ over tasks in the SVD basis of each row's orthogonal parts, from their Gram matrices.

    ``gram`` (rows, T, T) = P Pᵀ in float64, ``scale2`` (rows,) the rows' s² (see the module doc).
    """
    lam, u = torch.linalg.eigh(gram)  # ascending
    scale2 = scale2.unsqueeze(1)
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
    y = torch.bmm(u, (merged_coords * inv_sqrt).unsqueeze(2)).squeeze(2)  # U Λ^{-1/2} c̄
    conflict = (values > 0).any(0) & (values < 0).any(0) & keep
    return OrthogonalChunk(y, keep.sum(1), conflict.sum())


def orthogonal_merge(p: torch.Tensor, weights: torch.Tensor, merge_fn: str) -> torch.Tensor:
    """τ̄⊥ (rows, d) of orthogonal parts ``p`` (rows, T, d), float64, with s = ‖P‖_F per row."""
    gram = torch.bmm(p, p.transpose(1, 2))
    chunk = orthogonal_coefficients(gram, torch.diagonal(gram, dim1=1, dim2=2).sum(1), weights, merge_fn)
    return torch.bmm(chunk.y.unsqueeze(1), p).squeeze(1)


@dataclass
class NeuronMerge:
    """Unscaled merged parts of one neuron tensor (or block of rows) and its statistics."""

    parallel: torch.Tensor  # τ̄∥ (out, d) float32
    orthogonal: torch.Tensor  # τ̄⊥ (out, d) float32
    stats: dict[str, Any] = field(default_factory=dict)  # figures that add up over blocks of rows


def _load_rows(buffer: torch.Tensor, base: torch.Tensor, tau: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Q = [τ_1; …; τ_T; w0] per row of [r0, r1) in float64, in ``buffer``."""
    num_tasks = tau.shape[0]
    q = buffer[: r1 - r0]
    q[:, :num_tasks].copy_(tau[:, r0:r1].transpose(0, 1))
    q[:, num_tasks].copy_(base[r0:r1])
    return q


def _projections(gram: torch.Tensor, num_tasks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(⟨τ_t, w0⟩ (rows, T), ‖w0‖² (rows,), a_t (rows, T)) from the Gram matrices of Q (rows, T+1, T+1)."""
    dots, norm2 = gram[:, :num_tasks, num_tasks], gram[:, num_tasks, num_tasks]
    safe = norm2.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(1)
    a = torch.where(norm2.unsqueeze(1) > 0, dots / safe, 0.0)
    return dots, norm2, a


def _buffer(chunks: list[tuple[int, int]], num_tasks: int, width: int, device: torch.device) -> torch.Tensor:
    return torch.empty((max((r1 - r0 for r0, r1 in chunks), default=0), num_tasks + 1, width),
                       dtype=torch.float64, device=device)


def _gram(q: torch.Tensor) -> torch.Tensor:
    return torch.bmm(q, q.transpose(1, 2))


def parallel_sign_sum(base: torch.Tensor, tau: torch.Tensor, weights: torch.Tensor, budget: int | None = None) -> float:
    """Σ over rows of the elected sign of the parallel coefficients a_t (as neuron_merge computes them):
    summed over a tensor's blocks of rows, the sign is the majority of its parallel election."""
    budget = budget or chunk_budget(base.device)
    out, width = base.shape
    num_tasks = tau.shape[0]
    chunks = row_chunks(out, num_tasks + 1, width, budget)
    buffer = _buffer(chunks, num_tasks, width, base.device)
    coeffs = torch.empty((num_tasks, out), dtype=torch.float64, device=base.device)
    for r0, r1 in chunks:
        coeffs[:, r0:r1] = _projections(_gram(_load_rows(buffer, base, tau, r0, r1)), num_tasks)[2].T
    return elected_sign_sum(coeffs, weights.to(torch.float64))


@dataclass
class RowCoefficients:
    """NeuroMerging's per-row results for a block of rows, from the Gram matrices of Q = [τ_1; …; τ_T; w0]."""

    a: torch.Tensor  # (rows, T) parallel coefficients a_t
    z: torch.Tensor  # (rows, T+1): τ̄⊥ = Qᵀ z per row
    chunk: OrthogonalChunk
    parallel_energy: torch.Tensor  # (T,) Σ over the rows of ‖a_t w0‖²
    orthogonal_energy: torch.Tensor  # (T,) Σ over the rows of ‖p_t‖²


def row_coefficients(gram: torch.Tensor, weights: torch.Tensor, merge_fn: str) -> RowCoefficients:
    """The coefficients of a block of rows from the Gram matrices (rows, T+1, T+1) of their Q (float64)."""
    with one_cpu_thread(gram.device):
        return _row_coefficients(gram, weights, merge_fn)


def _row_coefficients(gram: torch.Tensor, weights: torch.Tensor, merge_fn: str) -> RowCoefficients:
    num_tasks = gram.shape[1] - 1
    dots, norm2, a = _projections(gram, num_tasks)
    safe = norm2.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(1)
    # ⟨p_s, p_t⟩ = ⟨τ_s, τ_t⟩ − ⟨τ_s, w0⟩⟨τ_t, w0⟩/‖w0‖²; the cancellation error (≈ eps64·s²) is far
    # below the rank tolerance, which is relative to s² = Σ_t ‖τ_t‖²
    outer = dots.unsqueeze(2) * dots.unsqueeze(1)
    gram_tau = gram[:, :num_tasks, :num_tasks]
    gram_p = gram_tau - torch.where(norm2.reshape(-1, 1, 1) > 0, outer / safe.unsqueeze(2), 0.0)
    scale2 = torch.diagonal(gram_tau, dim1=1, dim2=2).sum(1)
    chunk = orthogonal_coefficients(gram_p, scale2, weights, merge_fn)
    # τ̄⊥ = Σ_t y_t (τ_t − a_t w0) = Qᵀ [y; −Σ_t y_t a_t]
    z = torch.cat([chunk.y, -(chunk.y * a).sum(1, keepdim=True)], dim=1)
    return RowCoefficients(a, z, chunk, (a * dots).sum(0), torch.diagonal(gram_p, dim1=1, dim2=2).sum(0))


class NeuronTally:
    """What the neuron step adds up over the blocks of rows of one tensor (or block of it)."""

    def __init__(self, num_tasks: int, out: int, device: torch.device) -> None:
        self.coeffs = torch.empty((num_tasks, out), dtype=torch.float64, device=device)
        self.rank = torch.empty(out, dtype=torch.int64, device=device)
        self.parallel_energy = torch.zeros(num_tasks, dtype=torch.float64, device=device)
        self.orthogonal_energy = torch.zeros(num_tasks, dtype=torch.float64, device=device)
        self.conflicts = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, r0: int, r1: int, c: RowCoefficients) -> None:
        self.coeffs[:, r0:r1] = c.a.T
        self.rank[r0:r1] = c.chunk.rank
        self.conflicts += c.chunk.conflicts
        self.parallel_energy += c.parallel_energy
        self.orthogonal_energy += c.orthogonal_energy

    def parallel(self, weights: torch.Tensor, merge_fn: str, majority: Majority) -> torch.Tensor:
        """ψ_t(a_t) per row (out,), float64: the elections over the rows (see neuron_merge)."""
        return merge_values(self.coeffs, weights.to(torch.float64), merge_fn, majority=majority)

    def stats(self, parallel_sq: float, orthogonal_sq: float) -> dict[str, Any]:
        """The report's figures, given ‖τ̄∥‖² and ‖τ̄⊥‖²."""
        out = self.rank.shape[0]
        coeffs = self.coeffs
        par_conflicts = int(((coeffs > 0).any(0) & (coeffs < 0).any(0)).sum())
        orth_conflicts, elections_orth = int(self.conflicts), int(self.rank.sum())
        total = self.parallel_energy + self.orthogonal_energy
        return {
            "parallel_share": Ratio(tuple(self.parallel_energy.tolist()), tuple(total.tolist())),
            "orthogonal_share": Ratio(tuple(self.orthogonal_energy.tolist()), tuple(total.tolist())),
            "mean_orthogonal_rank": Ratio(elections_orth, out),
            "sign_conflict": Ratio(par_conflicts + orth_conflicts, out + elections_orth),
            "sign_conflict_parallel": Ratio(par_conflicts, out),
            "sign_conflict_orthogonal": Ratio(orth_conflicts, elections_orth),
            "parallel_norm": Norm(parallel_sq),
            "orthogonal_norm": Norm(orthogonal_sq),
        }


def neuron_merge(base: torch.Tensor, tau: torch.Tensor, weights: torch.Tensor, merge_fn: str,
                 budget: int | None = None, parallel_majority: Majority = None) -> NeuronMerge:
    """NeuroMerging's neuron step for base rows (out, d) and (masked) task rows τ (T, out, d).

    τ̄∥ = ψ_t(a_t)·w0 with the elections over the tensor's rows (given as ``parallel_majority``, see
    elect.elected_signs, when the rows are a block of the tensor; parallel_sign_sum finds it);
    τ̄⊥ = V ψ_t(C) per row. Rows are processed in blocks of about ``budget`` float64 elements
    (rows·(T+1)·d).
    """
    budget = budget or chunk_budget(base.device)
    out, width = base.shape
    num_tasks = tau.shape[0]
    tally = NeuronTally(num_tasks, out, base.device)
    orthogonal = torch.empty((out, width), dtype=torch.float32, device=base.device)
    chunks = row_chunks(out, num_tasks + 1, width, budget)
    buffer = _buffer(chunks, num_tasks, width, base.device)
    for r0, r1 in chunks:
        # Q = [τ_1; …; τ_T; w0] per row: one Gram matrix gives ⟨τ_s, τ_t⟩, ⟨τ_t, w0⟩ and ‖w0‖²
        q = _load_rows(buffer, base, tau, r0, r1)
        c = row_coefficients(_gram(q), weights, merge_fn)
        orthogonal[r0:r1].copy_(torch.bmm(c.z.unsqueeze(1), q).squeeze(1))
        tally.add(r0, r1, c)
    parallel = tally.parallel(weights, merge_fn, parallel_majority).float().unsqueeze(1) * base
    stats = tally.stats(float(parallel.double().square().sum()), float(orthogonal.double().square().sum()))
    return NeuronMerge(parallel, orthogonal, stats)


def fused_neurons(rows: list[torch.Tensor], gram: torch.Tensor, fusion: NeuronFusion, weights: torch.Tensor,
                  majority: Majority, dtype: torch.dtype) -> tuple[kernels.NeuronOutput, dict[str, Any]]:
    """The rest of a fused neuron merge (base.NeuronFusion) of [θ0, θ_1..θ_T] as stored, each (out, d),
    once kernels.neuron_gram has given the Gram matrices of their Q: the per-row coefficients, then
    θ0 + λ1·τ̄∥ + λ2·τ̄⊥ in ``dtype`` in one more read (kernels.neuron_output); and neuron_merge's figures.
    ``majority``: as neuron_merge's ``parallel_majority``."""
    c = row_coefficients(gram, weights, fusion.merge_fn)
    tally = NeuronTally(gram.shape[1] - 1, gram.shape[0], gram.device)
    tally.add(0, gram.shape[0], c)
    coefficient = tally.parallel(weights, fusion.merge_fn, majority).float()
    out = kernels.neuron_output(rows, fusion.thresholds, c.z, coefficient, fusion.lambda1, fusion.lambda2, dtype)
    return out, tally.stats(out.parallel_sq, out.orthogonal_sq)
