"""neuromerging: trim, then merge each neuron's parallel and orthogonal subspaces separately.

θ = θ0 + λ1·τ̄∥ + λ2·τ̄⊥ for neuron tensors (ndim >= 2, rows = neurons) and θ0 + λ_point·ψ(m∘τ)
for point tensors. λ2 = auto is 1/(1 − max_t σ_t), σ_t the L1 share of τ_t removed by the trim.
Task weights w_t act as in ties: ψ elects on w_t·x_t and averages with weights w_t (see
elect.merge_values); the subspaces (w0, the SVD basis of the orthogonal parts) do not depend on them.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import MergeError
from ..stats import GlobalStat, TensorMajorityStat, TrimStat
from .base import Fusion, Method, NeuronFusion, TensorJob, TensorParts
from .common import MASK_SCOPE, MERGE_FN, density
from .elect import merge_values, sign_conflict_rate
from .params import Param, number, number_or_auto
from .subspaces import as_rows, neuron_merge, parallel_sign_sum

LAMBDA1 = number("lambda1", 0.0, "scale of the merged parallel parts τ̄∥ (along each base row)", lo=0.0)
LAMBDA2 = number_or_auto("lambda2", "scale of the merged orthogonal parts τ̄⊥; auto = 1/(1 − max_t σ_t)")


def _lambda_point() -> Param:
    """A number, or 'lambda2' (the default): the same scale as the orthogonal parts."""
    inner = number("lambda_point", None, "", lo=0.0)

    def check(value: Any) -> float | str:
        return "lambda2" if value == "lambda2" else inner.check(value)

    return Param("lambda_point", "lambda2", "scale of merged point parameters (biases, norms)", check,
                 f"lambda2 | {inner.kind}")


class NeuroMerging(Method):
    name = "neuromerging"
    summary = "NeuroMerging: trim, then per neuron merge the parallel and the orthogonal (SVD) subspaces"
    params = (density(0.15), MASK_SCOPE, LAMBDA1, LAMBDA2, MERGE_FN, _lambda_point())
    scale_params = ("lambda1", "lambda2", "lambda_point")

    def global_stats(self, params: dict[str, Any], num_tasks: int, device: torch.device) -> list[GlobalStat]:
        trim = TrimStat(params["density"], params["mask_scope"], num_tasks, device, sampled=True)
        if params["merge_fn"] not in ("elect_mean", "elect_sum"):
            return [trim]

        def sign_sum(name: str, shape: torch.Size, row: int, base: torch.Tensor, deltas: torch.Tensor,
                     weights: torch.Tensor) -> float:
            # point tensors are merged whole (the engine never cuts 1-d tensors): no cached majority needed
            return parallel_sign_sum(base, trim.mask(deltas, name), weights) if len(shape) >= 2 else 0.0

        # the parallel election's majority sign per neuron tensor, for blocks of rows with an exact tie
        return [trim, TensorMajorityStat(sign_sum, device)]

    def rowwise(self, params: dict[str, Any]) -> bool:
        return True  # neurons are independent given the thresholds and the parallel majority sign

    def merge_parts(self, job: TensorJob, params: dict[str, Any]) -> TensorParts:
        trimmed = job.stats["trim"].mask(job.deltas, job.name)
        if job.role != "neuron":
            merged = merge_values(trimmed, job.weights, params["merge_fn"])
            return TensorParts({"lambda_point": merged}, {"sign_conflict": sign_conflict_rate(trimmed)})
        result = neuron_merge(as_rows(job.base), as_rows(trimmed, 1), job.weights, params["merge_fn"],
                              parallel_majority=job.tensor_majority())
        shape = job.base.shape
        return TensorParts({"lambda1": result.parallel.reshape(shape), "lambda2": result.orthogonal.reshape(shape)},
                           result.stats)

    def fusion(self, params: dict[str, Any], scales: dict[str, float] | None, stats: dict[str, GlobalStat],
               name: str, role: str) -> Fusion | NeuronFusion | None:
        trim = stats["trim"]
        assert isinstance(trim, TrimStat) and scales is not None
        if not trim.knows_thresholds(name):
            return None
        thresholds = trim.thresholds_of(name)
        if role != "neuron":
            return Fusion(params["merge_fn"], scales["lambda_point"], thresholds, conflicts=True)
        return NeuronFusion(params["merge_fn"], scales["lambda1"], scales["lambda2"], thresholds)

    def scales(self, params: dict[str, Any], stats: dict[str, GlobalStat]) -> dict[str, float]:
        lambda2 = params["lambda2"]
        if lambda2 == "auto":
            sigma = max_sigma(stats)
            if sigma >= 1.0:
                raise MergeError("parameters.lambda2: auto is undefined: the trim removed all of a task vector "
                                 "(σ = 1); give lambda2 a number")
            lambda2 = 1.0 / (1.0 - sigma)
        point = params["lambda_point"]
        return {"lambda1": params["lambda1"], "lambda2": lambda2,
                "lambda_point": lambda2 if point == "lambda2" else point}

    def report(self, params: dict[str, Any], stats: dict[str, GlobalStat]) -> dict[str, Any]:
        scales = self.scales(params, stats)
        extra = {k: stats[k].summary() for k in ("tensor_majority",) if k in stats}
        return {"trim": stats["trim"].summary(), "sigma": max_sigma(stats), **scales,
                "lambda2_auto": params["lambda2"] == "auto", **extra}


def max_sigma(stats: dict[str, GlobalStat]) -> float:
    """σ = max_t σ_t of the trim."""
    trim = stats["trim"]
    assert isinstance(trim, TrimStat)
    return max(trim.sigma, default=0.0)
