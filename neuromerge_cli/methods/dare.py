"""dare_linear / dare_ties: random drop with rescale, then task arithmetic or TIES election."""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..stats import GlobalStat, TensorMajorityStat
from .base import Fusion, Method, TensorJob, TensorParts
from .common import LAMBDA, MERGE_FN, SEED, dare_drop, dare_masks, density
from .elect import merge_values, sign_conflict_rate, weighted_sum

KEEP = density(0.2, "probability of keeping each entry of a task vector (1 − p); kept entries are scaled by 1/density")


class DareLinear(Method):
    name = "dare_linear"
    summary = "DARE drop-and-rescale, then task arithmetic: θ = θ0 + λ Σ w_t DARE(τ_t)"
    params = (KEEP, LAMBDA, SEED)
    positive_weights = False
    scale_params = ("lambda",)

    def rowwise(self, params: dict[str, Any]) -> bool:
        return True  # the drop of an entry depends on its index only (see dare_keep)

    def merge_parts(self, job: TensorJob, params: dict[str, Any]) -> TensorParts:
        dropped = dare_drop(job.deltas, params["density"], params["seed"], job.name, job.row, job.rows)
        return TensorParts({"lambda": weighted_sum(dropped, job.weights)})

    def fusion(self, params: dict[str, Any], scales: dict[str, float] | None, stats: dict[str, GlobalStat],
               name: str, role: str) -> Fusion | None:
        assert scales is not None
        return Fusion("sum", scales["lambda"], **dare_fusion(params, name))


class DareTies(Method):
    name = "dare_ties"
    summary = "DARE drop-and-rescale, then TIES sign election and merge: θ = θ0 + λ τ̄"
    params = (KEEP, LAMBDA, MERGE_FN, SEED)
    scale_params = ("lambda",)

    def global_stats(self, params: dict[str, Any], num_tasks: int, device: torch.device) -> list[GlobalStat]:
        if params["merge_fn"] not in ("elect_mean", "elect_sum"):
            return []
        # the tensor's majority sign of the dropped values (SPEC: the group of per-tensor TIES is the
        # tensor), for blocks of rows with an exact tie: settled in the merge pass
        return [TensorMajorityStat(None, device)]

    def rowwise(self, params: dict[str, Any]) -> bool:
        return True

    def merge_parts(self, job: TensorJob, params: dict[str, Any]) -> TensorParts:
        dropped = dare_drop(job.deltas, params["density"], params["seed"], job.name, job.row, job.rows)
        merged = merge_values(dropped, job.weights, params["merge_fn"], majority=job.tensor_majority("lambda"))
        return TensorParts({"lambda": merged}, {"sign_conflict": sign_conflict_rate(dropped)})

    def fusion(self, params: dict[str, Any], scales: dict[str, float] | None, stats: dict[str, GlobalStat],
               name: str, role: str) -> Fusion | None:
        assert scales is not None
        return Fusion(params["merge_fn"], scales["lambda"], conflicts=True, **dare_fusion(params, name))

    def report(self, params: dict[str, Any], stats: dict[str, GlobalStat]) -> dict[str, Any]:
        return {k: s.summary() for k, s in stats.items()}


def dare_fusion(params: dict[str, Any], name: str) -> dict[str, Any]:
    """The drop of tensor ``name`` as Fusion fields (none when every entry is kept)."""
    keep = params["density"]
    if keep >= 1.0:
        return {}
    return {"drop": functools.partial(dare_masks, keep, params["seed"], name), "keep": keep}
