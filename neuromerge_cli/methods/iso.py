"""iso_c / iso_cts: isotropic merging (Marczak et al., 2025, "No Task Left Behind: Isotropic Model
Merging with Common and Task-Specific Subspaces").

As in the authors' code (danielm1405/iso-merging, via AntoAndGar/task_singular_vectors), for each
2-D tensor (m×n, r = min(m, n)) with M = Σ_t τ_t = U diag(S) Vᵀ:
- ``iso_c``: delta = mean(S)·U Vᵀ (every singular value replaced by their mean).
- ``iso_cts``: common rank c = ⌊f·r⌋ (f = ``common_fraction``), per-task rank
  k = round((r − c)/T) (Python's round, half to even, as the authors; at most ⌊r/T⌋), then
  c = r − T·k. Each task's residual R_t = τ_t − U_c U_cᵀ τ_t gives its top-k singular triplets;
  [U_1..U_T, U_c] and [V_1..V_T, V_c] are orthogonalised (polar factors), and the spectrum is
  made isotropic: delta = mean(S_1..S_T, S_c)·U⊥ V⊥ᵀ. With k = 0 this is ``iso_c``.
Singular directions with a negligible singular value (arbitrary vectors: a zero residual, a layer
left frozen, an exactly low-rank M) are left out of U⊥ V⊥ᵀ; the mean still counts their (zero)
singular values, as the authors' code does — which instead gives those arbitrary directions the
full mean value. θ = θ0 + α·delta. α = 1 by default: the authors always pick α on validation data (a grid); with
none, 1 is the unscaled merge. Other tensors get the weighted average of the τ_t, scaled by α.
Recipe weights multiply τ_t after scaling to mean 1 (all-equal weights change nothing).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Method, TensorJob, TensorParts
from .params import number
from .svd import ALPHA, SVD_DTYPE, SVD_DTYPES, TaskMatrices, average, is_matrix, polar, svd_errors, top_svd


def split_rank(rank: int, num_tasks: int, common_fraction: float) -> tuple[int, int]:
    """(common rank c, per-task rank k) with c + T·k = rank, as the authors compute them."""
    common = int(rank * common_fraction)
    per_task = min(round((rank - common) / num_tasks), rank // num_tasks)
    return rank - num_tasks * per_task, per_task


def iso_c_merge(tasks: TaskMatrices) -> torch.Tensor:
    """mean(S)·U Vᵀ of M = Σ_t τ_t (over the defined singular directions)."""
    total = tasks.total()
    u, s, vh, keep = top_svd(total, min(total.shape))
    return (u[:, keep] @ vh[keep]).mul_(s.mean())


def iso_cts_merge(tasks: TaskMatrices, common_fraction: float) -> torch.Tensor:
    """Common subspace of Σ_t τ_t plus each task's residual subspace, orthogonalised, isotropic."""
    common, per_task = split_rank(min(tasks.shape), len(tasks), common_fraction)
    if per_task == 0:
        return iso_c_merge(tasks)
    u, s, vh, keep = top_svd(tasks.total(), common)
    u_common = u[:, keep]
    # τ_t − U_c U_cᵀ τ_t, in place: each task matrix is a fresh copy
    triplets = [top_svd(tau.addmm_(u_common, u_common.T @ tau, alpha=-1), per_task) for tau in tasks]
    keep_all = torch.cat([t[3] for t in triplets] + [keep])
    u_all = torch.cat([t[0] for t in triplets] + [u], dim=1)[:, keep_all]
    s_all = torch.cat([t[1] for t in triplets] + [s])
    vh_all = torch.cat([t[2] for t in triplets] + [vh], dim=0)[keep_all]
    del triplets
    if u_all.shape[1] == 0:  # Σ τ_t and every residual are zero
        return torch.zeros(tasks.shape, dtype=u.dtype, device=u.device)
    return (polar(u_all) @ polar(vh_all)).mul_(s_all.mean())


class IsoC(Method):
    name = "iso_c"
    summary = "Iso-C: SVD of Σ τ_t with every singular value set to their mean; θ = θ0 + α τ̄"
    params = (ALPHA, SVD_DTYPE)
    scale_params = ("alpha",)

    def merge_parts(self, job: TensorJob, params: dict[str, Any]) -> TensorParts:
        if not is_matrix(job.deltas):
            return TensorParts({"alpha": average(job.deltas, job.weights)})
        tasks = TaskMatrices(job.deltas, job.weights, SVD_DTYPES[params["svd_dtype"]])
        with svd_errors(job.name):
            delta = iso_c_merge(tasks).to(job.deltas.dtype)
        return TensorParts({"alpha": delta})


class IsoCts(Method):
    name = "iso_cts"
    summary = "Iso-CTS: common subspace of Σ τ_t plus task-specific subspaces, isotropic; θ = θ0 + α τ̄"
    params = (
        ALPHA,
        number("common_fraction", 0.8, "share of each matrix's rank given to the common subspace", lo=0.0, hi=1.0),
        SVD_DTYPE,
    )
    scale_params = ("alpha",)

    def merge_parts(self, job: TensorJob, params: dict[str, Any]) -> TensorParts:
        if not is_matrix(job.deltas):
            return TensorParts({"alpha": average(job.deltas, job.weights)})
        tasks = TaskMatrices(job.deltas, job.weights, SVD_DTYPES[params["svd_dtype"]])
        common, per_task = split_rank(min(job.deltas.shape[1:]), len(tasks), params["common_fraction"])
        with svd_errors(job.name):
            delta = iso_cts_merge(tasks, params["common_fraction"]).to(job.deltas.dtype)
        return TensorParts({"alpha": delta}, {"common_rank": common, "svd_rank_per_task": per_task})
