"""task_arithmetic: θ = θ0 + λ Σ w_t τ_t."""

from __future__ import annotations

from typing import Any

import torch

from .base import Combination, Method, TensorJob, TensorParts
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

    def combination(self, params: dict[str, Any], scales: dict[str, float] | None,
                    weights: torch.Tensor) -> Combination | None:
        return None if scales is None else Combination(scales["lambda"])
