"""linear: weighted average of the checkpoints."""

from __future__ import annotations

from typing import Any

from .base import Method, TensorJob, TensorResult


class Linear(Method):
    name = "linear"
    summary = "weighted average: θ = Σ w_t θ_t / Σ w_t"

    def rowwise(self, params: dict[str, Any]) -> bool:
        return True

    def merge(self, job: TensorJob, params: dict[str, Any]) -> TensorResult:
        w = job.weights.reshape((-1,) + (1,) * (job.deltas.ndim - 1))
        return TensorResult((job.deltas * w).sum(0) / job.weights.sum())
