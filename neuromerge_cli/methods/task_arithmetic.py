"""task_arithmetic: θ = θ0 + λ Σ w_t τ_t."""

from __future__ import annotations

from typing import Any

from ..stats import GlobalStat
from .base import Fusion, Method, TensorJob, TensorParts
from .common import LAMBDA
from .elect import weighted_sum


class TaskArithmetic(Method):
    name = "task_arithmetic"
    summary = "sum of task vectors: θ = θ0 + λ Σ w_t τ_t"
    params = (LAMBDA,)
    positive_weights = False
    scale_params = ("lambda",)

    def rowwise(self, params: dict[str, Any]) -> bool:
        return True

    def merge_parts(self, job: TensorJob, params: dict[str, Any]) -> TensorParts:
        return TensorParts({"lambda": weighted_sum(job.deltas, job.weights)})

    def fusion(self, params: dict[str, Any], scales: dict[str, float] | None, stats: dict[str, GlobalStat],
               name: str, role: str) -> Fusion | None:
        return None if scales is None else Fusion("sum", scales["lambda"])
