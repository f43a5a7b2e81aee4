"""linear: weighted average of the checkpoints."""

from __future__ import annotations

from typing import Any

from ..stats import GlobalStat
from .base import Fusion, Method, TensorJob, TensorResult
from .elect import weighted_sum


class Linear(Method):
    name = "linear"
    summary = "weighted average: θ = Σ w_t θ_t / Σ w_t"

    def rowwise(self, params: dict[str, Any]) -> bool:
        return True

    def merge(self, job: TensorJob, params: dict[str, Any]) -> TensorResult:
        return TensorResult(weighted_sum(job.deltas, job.weights) / job.weights.sum())

    def fusion(self, params: dict[str, Any], scales: dict[str, float] | None, stats: dict[str, GlobalStat],
               name: str, role: str) -> Fusion | None:
        return Fusion("mean")  # Σ w_t τ_t / Σ w_t
