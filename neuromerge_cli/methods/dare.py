"""dare_linear / dare_ties: random drop with rescale, then task arithmetic or TIES election."""

from __future__ import annotations

from typing import Any

from .base import Method, TensorJob, TensorParts
from .common import LAMBDA, MERGE_FN, SEED, dare_drop, density
from .elect import merge_values, sign_conflict_rate, weighted_sum

KEEP = density(0.2, "probability of keeping each entry of a task vector (1 − p); kept entries are scaled by 1/density")


class DareLinear(Method):
    name = "dare_linear"
    summary = "DARE drop-and-rescale, then task arithmetic: θ = θ0 + λ Σ w_t DARE(τ_t)"
    params = (KEEP, LAMBDA, SEED)
    positive_weights = False
    scale_params = ("lambda",)

    def merge_parts(self, job: TensorJob, params: dict[str, Any]) -> TensorParts:
        dropped = dare_drop(job.deltas, params["density"], params["seed"], job.name)
        return TensorParts({"lambda": weighted_sum(dropped, job.weights)})


class DareTies(Method):
    name = "dare_ties"
    summary = "DARE drop-and-rescale, then TIES sign election and merge: θ = θ0 + λ τ̄"
    params = (KEEP, LAMBDA, MERGE_FN, SEED)
    scale_params = ("lambda",)

    def merge_parts(self, job: TensorJob, params: dict[str, Any]) -> TensorParts:
        dropped = dare_drop(job.deltas, params["density"], params["seed"], job.name)
        merged = merge_values(dropped, job.weights, params["merge_fn"])
        return TensorParts({"lambda": merged}, {"sign_conflict": sign_conflict_rate(dropped)})
