"""What a merge method is: parameters, the global statistics it needs, and a per-tensor kernel."""

from __future__ import annotations

import functools
from abc import ABC
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from ..errors import MergeError, did_you_mean, key_text
from ..stats import GlobalStat, deferred_majority
from .elect import DeferredMajority
from .params import Param

if TYPE_CHECKING:
    from ..plan import Plan
    from ..recipe import Recipe


@dataclass
class TensorJob:
    """One tensor to merge, or the block of its first-dimension rows [row, row + base.shape[0]), in
    float32 on the compute device."""

    name: str
    role: str  # "neuron" (ndim >= 2) or "point" (ndim <= 1)
    base: torch.Tensor  # θ0, original shape
    deltas: torch.Tensor  # τ_t stacked: (T, *shape)
    weights: torch.Tensor  # (T,)
    stats: dict[str, GlobalStat] = field(default_factory=dict)  # finished global statistics by key
    seed: int = 0  # per-tensor seed, derived from the recipe seed and the tensor name
    row: int = 0  # first row of the block
    rows: int | None = None  # rows of the whole tensor when the job is a block of them, else None

    deferred: DeferredMajority | None = None  # set by tensor_majority: this block's ties await their group's sign

    def tensor_majority(self, part: str = "") -> Callable[[], float] | DeferredMajority | None:
        """For an election whose group is the tensor, or the model (stats.ModelMajorityStat): None for a whole
        tensor of a per-tensor group (the election finds its majority sign itself), else (stats.deferred_majority)
        a function giving the tensor's majority sign, or a DeferredMajority kept as ``deferred`` for the engine
        to settle once the group's last block is merged; ``part`` is the key of the result part the elected
        values are."""
        stat = deferred_majority(self.stats, self.rows is not None)
        if stat is None:
            return None
        if stat.deferred:
            # partial, not a lambda over self: the engine holds the election, and must not hold the job's τ
            self.deferred = DeferredMajority(functools.partial(stat.add, self.name), stat.guess(self.name),
                                             self.base, part)
            return self.deferred
        return lambda: stat.majority(self.name, self.weights)


@dataclass
class TensorResult:
    """The merged task vector of one tensor (θ = θ0 + delta) and its statistics for the report."""

    delta: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class TensorParts:
    """A merged task vector before its global scales: delta = Σ_k scales[k] · parts[k].

    Methods whose scale parameters (λ, λ1, λ2, …) only scale parts of the result return this, so
    that a sweep over those parameters computes the parts once and writes every point from them.
    """

    parts: dict[str, torch.Tensor]
    stats: dict[str, Any] = field(default_factory=dict)

    def combine(self, scales: dict[str, float]) -> torch.Tensor:
        out: torch.Tensor | None = None
        for key, part in self.parts.items():
            term = part * scales[key]
            out = term if out is None else out.add_(term)
        assert out is not None, "a method returned no parts"
        return out


@dataclass(frozen=True)
class Fusion:
    """A merge of one tensor that the engine may run as one fused sweep over the stored inputs
    (kernels.merge), bit for bit the torch path: the task vectors dropped as DARE does (``drop``:
    common.dare_masks less the block's geometry (T, block shape, first row, rows of the tensor), with
    keep probability ``keep``; None: no drop), trimmed at ``thresholds`` (one per task, as
    stats.TrimStat.mask; None: no trim), ψ = ``merge_fn`` of them with the task weights
    (elect.merge_values), delta = ψ · ``scale``. An election falls back to ``majority`` where a sum is
    0 (None: the tensor's own majority sign, as elect.elected_signs or a DeferredMajority finds it);
    with ``conflicts`` the result reports elect.sign_conflict_rate as ``sign_conflict``."""

    merge_fn: str
    scale: float = 1.0
    thresholds: torch.Tensor | None = None
    majority: float | None = None
    conflicts: bool = False
    drop: Callable[[int, torch.Size, int, int | None], list[torch.Tensor]] | None = None
    keep: float = 1.0


@dataclass(frozen=True)
class NeuronFusion:
    """NeuroMerging's merge of a neuron tensor (rows = neurons) that the engine may run as two fused
    sweeps over the stored inputs around the per-row work (methods.subspaces.fused_neurons): the task
    rows trimmed at ``thresholds`` (as stats.TrimStat.mask; None: no trim), delta = λ1·τ̄∥ + λ2·τ̄⊥
    with ψ = ``merge_fn``."""

    merge_fn: str
    lambda1: float
    lambda2: float
    thresholds: torch.Tensor | None = None


class Method(ABC):
    """A merge method. Subclasses set ``name``, ``summary`` and ``params`` and write ``merge``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    positive_weights: ClassVar[bool] = True
    scale_params: ClassVar[tuple[str, ...]] = ()  # parameters that only scale parts of the result
    uses_categories: ClassVar[bool] = False  # reads the models' `category` keys (recipe)

    def parse_params(self, raw: dict[str, Any], where: str = "parameters") -> dict[str, Any]:
        """Check the recipe's ``parameters`` against this method's; fill defaults.

        ``where`` is the recipe key the mapping came from, for error messages (a method that
        delegates to another validates the nested mapping under its own key).
        """
        known = {p.name: p for p in self.params}
        for key in raw:
            if key not in known:
                allowed = ", ".join(known) or "none"
                raise MergeError(
                    f"{where}.{key_text(key)}: method '{self.name}' takes no parameter {key!r} "
                    f"({did_you_mean(key, known)}allowed: {allowed})"
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
                raise MergeError(f"{where}.{p.name}: {exc}") from None
        try:
            self.check_params(values)
        except MergeError as exc:
            if where == "parameters" or not str(exc).startswith("parameters."):
                raise
            raise MergeError(where + str(exc).removeprefix("parameters")) from None
        return values

    def check_params(self, values: dict[str, Any]) -> None:
        """Cross-parameter checks; raise MergeError("parameters.<key>: ...")."""

    def bind(self, recipe: "Recipe", plan: "Plan") -> None:
        """Checks that need the planned tensors and the whole recipe (run by ``validate`` and before
        a merge); a method may keep run context here for ``global_stats`` and ``merge``."""

    def global_stats(self, params: dict[str, Any], num_tasks: int, device: torch.device) -> list[GlobalStat]:
        """The whole-model statistics this method needs before its merge pass."""
        return []

    def rowwise(self, params: dict[str, Any]) -> bool:
        """True when merging a block of a tensor's rows needs nothing from its other rows (given the
        global statistics) and every figure in the result's stats is a mean over the tensor's entries or
        a figures.Ratio / figures.Norm (which add up over blocks): the engine may then stream large
        tensors in blocks of rows, in bounded memory (point tensors, ndim <= 1, are never cut)."""
        return False

    def merge(self, job: TensorJob, params: dict[str, Any]) -> TensorResult:
        """Merge one tensor. Methods with ``scale_params`` write ``merge_parts`` instead."""
        split = self.merge_parts(job, params)
        return TensorResult(split.combine(self.scales(params, job.stats)), split.stats)

    def merge_parts(self, job: TensorJob, params: dict[str, Any]) -> TensorParts:
        """The unscaled parts of one tensor's merged task vector, keyed by scale parameter."""
        raise NotImplementedError(f"method '{self.name}' defines neither merge nor merge_parts")

    def scales(self, params: dict[str, Any], stats: dict[str, GlobalStat]) -> dict[str, float]:
        """The value of each scale parameter (a method resolves 'auto' values here)."""
        return {p: params[p] for p in self.scale_params}

    def fusion(self, params: dict[str, Any], scales: dict[str, float] | None, stats: dict[str, GlobalStat],
               name: str, role: str) -> Fusion | NeuronFusion | None:
        """This method's merge of tensor ``name`` (of ``role``, as TensorJob.role) as a Fusion or a
        NeuronFusion, when it is one for these parameters, the scale parameters' values ``scales`` and
        the finished statistics; else None."""
        return None

    def report(self, params: dict[str, Any], stats: dict[str, GlobalStat]) -> dict[str, Any]:
        """Method-level figures for merge_report.json (e.g. σ_t, λ2)."""
        return {}
