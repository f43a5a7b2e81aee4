"""ties: trim each task vector to its top-k magnitudes, elect signs, merge the agreeing values."""

from __future__ import annotations

from typing import Any

import torch

from ..stats import GlobalStat, MajoritySignStat, ModelMajorityStat, TensorMajorityStat, TrimStat
from .base import Fusion, Method, TensorJob, TensorParts
from .common import LAMBDA, MASK_SCOPE, MERGE_FN, density
from .elect import merge_values, sign_conflict_rate


class Ties(Method):
    name = "ties"
    summary = "TIES: top-k trim, sign election, mean of the agreeing values; θ = θ0 + λ τ̄"
    params = (density(0.2), LAMBDA, MASK_SCOPE, MERGE_FN)

    def global_stats(self, params: dict[str, Any], num_tasks: int, device: torch.device) -> list[GlobalStat]:
        # a per-tensor trim is found in the merge read: nothing needs σ_t before merging; a global one in one
        # read where a sample of rows aims it
        trim = TrimStat(params["density"], params["mask_scope"], num_tasks, device, in_merge_read=True, sampled=True)
        if params["merge_fn"] not in ("elect_mean", "elect_sum"):
            return [trim]
        if params["mask_scope"] == "global":  # the majority sign, from the merge read
            return [trim, ModelMajorityStat(trim, device)]
        # per-tensor majority signs for blocks of rows, settled in the merge pass
        return [trim, TensorMajorityStat(None, device)]

    scale_params = ("lambda",)

    def rowwise(self, params: dict[str, Any]) -> bool:
        return True  # given the thresholds and the global or per-tensor majority signs

    def merge_parts(self, job: TensorJob, params: dict[str, Any]) -> TensorParts:
        trimmed = job.stats["trim"].mask(job.deltas, job.name)
        majority = self._majority(job.stats)
        majority = job.tensor_majority("lambda") if majority is None else majority
        merged = merge_values(trimmed, job.weights, params["merge_fn"], majority=majority)
        return TensorParts({"lambda": merged}, {"sign_conflict": sign_conflict_rate(trimmed)})

    def fusion(self, params: dict[str, Any], scales: dict[str, float] | None, stats: dict[str, GlobalStat],
               name: str, role: str) -> Fusion | None:
        trim = stats["trim"]
        assert isinstance(trim, TrimStat) and scales is not None
        if not trim.knows_thresholds(name):
            return None
        majority = self._majority(stats)
        return Fusion(params["merge_fn"], scales["lambda"], trim.thresholds_of(name), majority, conflicts=True)

    @staticmethod
    def _majority(stats: dict[str, GlobalStat]) -> float | None:
        """The global majority sign where statistics reads found it (a delegate of NeuronMerge), else None."""
        stat = stats.get("majority")
        return stat.sign if isinstance(stat, MajoritySignStat) else None

    def report(self, params: dict[str, Any], stats: dict[str, GlobalStat]) -> dict[str, Any]:
        return {k: s.summary() for k, s in stats.items()}
