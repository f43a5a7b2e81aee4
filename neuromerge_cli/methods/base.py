"""What a merge method is: parameters, the global statistics it needs, and a per-tensor kernel."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import MergeError
from ..stats import GlobalStat
from .params import Param


@dataclass
class TensorJob:
    """One tensor to merge, in float32 on the compute device."""

    name: str
    role: str  # "neuron" (ndim >= 2) or "point" (ndim <= 1)
    base: torch.Tensor  # θ0, original shape
    deltas: torch.Tensor  # τ_t stacked: (T, *shape)
    weights: torch.Tensor  # (T,)
    stats: dict[str, GlobalStat] = field(default_factory=dict)  # finished global statistics by key
    seed: int = 0  # per-tensor seed, derived from the recipe seed and the tensor name


@dataclass
class TensorResult:
    """The merged task vector of one tensor (θ = θ0 + delta) and its statistics for the report."""

    delta: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)


class Method(ABC):
    """A merge method. Subclasses set ``name``, ``summary`` and ``params`` and write ``merge``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    positive_weights: ClassVar[bool] = True

    def parse_params(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Check the recipe's ``parameters`` against this method's; fill defaults."""
        known = {p.name: p for p in self.params}
        for key in raw:
            if key not in known:
                allowed = ", ".join(known) or "none"
                raise MergeError(
                    f"parameters.{key}: method '{self.name}' takes no parameter '{key}' (allowed: {allowed})"
                )
        values: dict[str, Any] = {}
        for p in self.params:
            value = raw.get(p.name, p.default)
            if value is None and p.default is None:
                values[p.name] = None
                continue
            try:
                values[p.name] = p.check(value)
            except ValueError as exc:
                raise MergeError(f"parameters.{p.name}: {exc}") from None
        self.check_params(values)
        return values

    def check_params(self, values: dict[str, Any]) -> None:
        """Cross-parameter checks; raise MergeError."""

    def global_stats(self, params: dict[str, Any], num_tasks: int, device: torch.device) -> list[GlobalStat]:
        """The whole-model statistics this method needs before its merge pass."""
        return []

    @abstractmethod
    def merge(self, job: TensorJob, params: dict[str, Any]) -> TensorResult:
        """Merge one tensor."""

    def report(self, params: dict[str, Any], stats: dict[str, GlobalStat]) -> dict[str, Any]:
        """Method-level figures for merge_report.json (e.g. σ_t, λ2)."""
        return {}
