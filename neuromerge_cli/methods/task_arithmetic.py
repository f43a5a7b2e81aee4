"""task_arithmetic: θ = θ0 + λ Σ w_t τ_t."""

from __future__ import annotations

from typing import Any

from .base import Method, TensorJob, TensorResult
from .common import LAMBDA


class TaskArithmetic(Method):
    name = "task_arithmetic"
    summary = "sum of task vectors: θ = θ0 + λ Σ w_t τ_t"
    params = (LAMBDA,)
    positive_weights = False

    def merge(self, job: TensorJob, params: dict[str, Any]) -> TensorResult:
        w = job.weights.reshape((-1,) + (1,) * (job.deltas.ndim - 1))
        return TensorResult(params["lambda"] * (job.deltas * w).sum(0))
