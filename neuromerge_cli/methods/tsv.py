"""tsv: TSV-Merge (Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task Interference").

For each 2-D tensor (m×n, r = min(m, n)) and T tasks, as in the authors' code
(AntoAndGar/task_singular_vectors, ``compute_and_sum_svd_mem_reduction``):
- SVD of each task's τ_t; keep its top k = ⌊r/T⌋ singular triplets (so that T·k ≤ r and the
  concatenation can be orthonormal);
- concatenate U (m×Tk), Σ (Tk) and Vᵀ (Tk×n) across tasks; replace U and Vᵀ by their orthonormal
  polar factors (SVD: U = P S Qᵀ → P Qᵀ); delta = U⊥ diag(Σ) V⊥ᵀ; θ = θ0 + α·delta.
Tensors that are not 2-D (biases, norms, conv kernels), and matrices with r < T (k would be 0;
the authors' code then returns zero), get the weighted average of the τ_t, scaled by α.
Triplets with a negligible singular value (e.g. all of a task that left this layer frozen) have
arbitrary singular vectors; they are left out before orthogonalising (they add nothing to the sum,
but in the authors' code their arbitrary vectors would bend the other tasks' ones).
Recipe weights multiply τ_t after scaling to mean 1 (all-equal weights change nothing).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Method, TensorJob, TensorParts
from .svd import ALPHA, SVD_DTYPE, SVD_DTYPES, TaskMatrices, average, is_matrix, polar, svd_errors, top_svd


def tsv_merge(tasks: TaskMatrices, k: int) -> torch.Tensor:
    """U⊥ diag(Σ) V⊥ᵀ from each task matrix's top-k singular triplets (the defined ones)."""
    triplets = [top_svd(tau, k) for tau in tasks]
    keep = torch.cat([t[3] for t in triplets])
    u = torch.cat([t[0] for t in triplets], dim=1)[:, keep]
    s = torch.cat([t[1] for t in triplets])[keep]
    vh = torch.cat([t[2] for t in triplets], dim=0)[keep]
    del triplets
    if s.numel() == 0:  # every task vector is zero here
        return torch.zeros(tasks.shape, dtype=u.dtype, device=u.device)
    return polar(u).mul_(s) @ polar(vh)


class Tsv(Method):
    name = "tsv"
    summary = "TSV-Merge: each task's top ⌊r/T⌋ singular vectors, orthogonalised across tasks; θ = θ0 + α τ̄"
    params = (ALPHA, SVD_DTYPE)
    scale_params = ("alpha",)

    def merge_parts(self, job: TensorJob, params: dict[str, Any]) -> TensorParts:
        num_tasks = job.deltas.shape[0]
        k = min(job.deltas.shape[1:]) // num_tasks if is_matrix(job.deltas) else 0
        if k == 0:
            return TensorParts({"alpha": average(job.deltas, job.weights)}, {"svd_rank_per_task": 0})
        tasks = TaskMatrices(job.deltas, job.weights, SVD_DTYPES[params["svd_dtype"]])
        with svd_errors(job.name):
            delta = tsv_merge(tasks, k).to(job.deltas.dtype)
        return TensorParts({"alpha": delta}, {"svd_rank_per_task": k})
