"""neuronmerge: merge gated-MLP neurons group by group (NeuronMerge, Gu et al. 2025).

Neurons are grouped by `neuromerge classify` (a groups file). For each MLP tensor:
- general neurons are merged by ``general_method``;
- task-specific neurons follow ``specific``: ``drop`` (reset to the base), ``choose`` (the
  fine-tuned neuron of the model whose ``category`` is the neuron's) or ``merge`` (merged with the
  general neurons, by ``general_method``);
every other tensor (attention, embeddings, norms, ``down_proj.bias``) is merged by ``other_method``.

Scopes of the delegated methods: ``general_method`` sees, for each MLP tensor, only the sub-tensor
of its merged neurons (general, plus the specific ones with ``specific: merge``), and its global
statistics (e.g. TIES's global trim) run over those sub-tensors only; ``other_method`` sees the
non-MLP tensors and its global statistics run over them only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..errors import MergeError
from ..neuron_groups import GENERAL, SUPPORTED_ARCHITECTURES, MlpSlot, NeuronGroups, load_groups, mlp_slot
from ..stats import GlobalStat, MajoritySignStat, ModelMajorityStat, TensorMajorityStat
from .base import Method, TensorJob, TensorResult
from .params import boolean, choice, integer, mapping, text

if TYPE_CHECKING:
    from ..plan import Plan
    from ..recipe import Recipe

DELEGATES = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "linear")
# NeuroMerging works on whole rows (neurons of the next layer), so only on the non-MLP tensors.
OTHER_DELEGATES = DELEGATES + ("neuromerging",)
SPECIFIC = ("drop", "choose", "merge")
GENERAL_SCOPE, OTHER_SCOPE = "general", "other"


@dataclass
class RunContext:
    """For one set of parameters: the groups (shuffled or not) and which model each category maps to."""

    groups: NeuronGroups
    task_of_code: dict[int, int]  # category code -> index of its model (for `choose`)


View = Callable[[str, torch.Tensor, "tuple[int, int] | None"], "torch.Tensor | None"]
"""(name, stacked values (k, ...) of a tensor or of its rows [start, stop), those rows or None for all) → the part
of the scope (selected along the tensor's dimensions), or None where it has none."""


class ScopedStat(GlobalStat):
    """A delegated method's statistic that sees only the tensors (or sub-tensors) of its scope."""

    def __init__(self, inner: GlobalStat, scope: str, view: View):
        self.inner = inner
        self.key = f"{scope}/{inner.key}"
        self.view = view
        self.after = None  # set by NeuronMerge.global_stats once every wrapper exists
        self.samples = inner.samples

    def observe_sample(self, name: str, tensors: list[torch.Tensor], stride: int, rows: tuple[int, int]) -> None:
        part = self.view(name, torch.stack(tensors), rows)
        if part is not None:
            self.inner.observe_sample(name, list(part), stride, rows)

    def end_sample(self) -> None:
        self.inner.end_sample()

    @property  # type: ignore[override]
    def passes(self) -> int:
        return self.inner.passes

    @property  # type: ignore[override]
    def in_merge_read(self) -> bool:
        return self.inner.in_merge_read

    def partials(self, pass_index: int) -> list[torch.Tensor] | None:
        return self.inner.partials(pass_index)

    def maxima(self, pass_index: int) -> list[torch.Tensor]:
        return self.inner.maxima(pass_index)

    def observe(self, pass_index: int, name: str, deltas: torch.Tensor, weights: torch.Tensor) -> None:
        part = self.view(name, deltas, None)
        if part is not None:
            self.inner.observe(pass_index, name, part, weights)

    def end_pass(self, pass_index: int) -> None:
        self.inner.end_pass(pass_index)

    def summary(self) -> dict[str, Any]:
        return self.inner.summary()


class NeuronMerge(Method):
    name = "neuronmerge"
    summary = ("NeuronMerge: MLP neurons grouped by function (`neuromerge classify`); general neurons merged, "
               "task-specific ones dropped/chosen/merged; other tensors by another method")
    params = (
        text("groups", None, "groups file written by `neuromerge classify` (required)"),
        choice("general_method", "task_arithmetic", "method for the general MLP neurons", DELEGATES),
        mapping("general_params", "parameters of general_method (checked by that method)"),
        choice("specific", "drop", "task-specific neurons: reset to the base, take the model of their "
               "category (its `category` key under models), or merge them like the general ones", SPECIFIC),
        choice("other_method", "dare_linear", "method for attention, embeddings, norms and other non-MLP tensors",
               OTHER_DELEGATES),
        mapping("other_params", "parameters of other_method (checked by that method)"),
        boolean("random_groups", False, "control experiment: shuffle the neurons among the groups of each layer "
                "(same group sizes), seeded by `seed`"),
        integer("seed", 0, "seed of random_groups"),
    )
    uses_categories = True

    def __init__(self) -> None:
        self._widths: dict[int, int] | None = None  # MLP layer -> intermediate size (from bind)
        self._categories: list[str | None] = []  # each model's category
        self._contexts: dict[tuple[Any, ...], RunContext] = {}

    def check_params(self, values: dict[str, Any]) -> None:
        if values["groups"] is None:
            raise MergeError("parameters.groups: missing (the groups file written by `neuromerge classify`)")
        for scope in ("general", "other"):
            delegate = _delegate(values[f"{scope}_method"])
            values[f"{scope}_params"] = delegate.parse_params(values[f"{scope}_params"] or {},
                                                              f"parameters.{scope}_params")

    def bind(self, recipe: "Recipe", plan: "Plan") -> None:
        layers: dict[int, dict[str, tuple[int, ...]]] = {}
        for t in plan.merged:
            slot = mlp_slot(t.name)
            if slot is not None and t.name.endswith(".weight"):
                layers.setdefault(slot.layer, {})[slot.proj] = t.shape
        if not layers:
            raise MergeError(f"method neuronmerge: {recipe.base_model} has no Llama-style gated MLP weights "
                             f"(model.layers.N.mlp.gate_proj/up_proj/down_proj.weight); supported: {SUPPORTED_ARCHITECTURES}")
        widths = {}
        for layer, projs in sorted(layers.items()):
            missing = [p for p in ("gate", "up", "down") if p not in projs]
            if missing:
                raise MergeError(f"method neuronmerge: layer {layer} has no mlp.{missing[0]}_proj.weight: not a gated "
                                 f"MLP (supported: {SUPPORTED_ARCHITECTURES})")
            widths[layer] = projs["gate"][0]
            if projs["up"][0] != widths[layer] or projs["down"][-1] != widths[layer]:
                raise MergeError(f"method neuronmerge: layer {layer}: gate_proj, up_proj and down_proj disagree on the "
                                 f"intermediate size ({projs['gate'][0]}, {projs['up'][0]}, {projs['down'][-1]})")
        self._widths = widths
        self._categories = [m.category for m in recipe.models]
        self._contexts.clear()
        self.context(recipe.params)  # checks the groups file now (validate, before any statistics)

    def context(self, params: dict[str, Any]) -> RunContext:
        """The groups (shuffled for random_groups) and category -> model map for these parameters.

        Built once per distinct (groups, random_groups, seed, specific): a sweep may vary them.
        """
        if self._widths is None:
            raise RuntimeError("neuronmerge: bind() must run before statistics and merging")
        key = (params["groups"], params["random_groups"], params["seed"], params["specific"])
        if key not in self._contexts:
            groups = load_groups(params["groups"])
            where = f"parameters.groups ({params['groups']})"
            for layer, width in self._widths.items():
                if layer not in groups.codes:
                    raise MergeError(f"{where}: no codes for MLP layer {layer} (classified with another model?)")
                if groups.codes[layer].numel() != width:
                    raise MergeError(f"{where}: layer {layer} has {groups.codes[layer].numel()} neurons, the model "
                                     f"has {width} (classified with another model?)")
            extra = sorted(set(groups.codes) - set(self._widths))
            if extra:
                raise MergeError(f"{where}: codes for layer {extra[0]}, which the model does not have")
            task_of_code = self._tasks_of_categories(groups, params["specific"], where)
            if params["random_groups"]:
                groups = groups.shuffled(params["seed"])
            self._contexts[key] = RunContext(groups, task_of_code)
        return self._contexts[key]

    def _tasks_of_categories(self, groups: NeuronGroups, specific: str, where: str) -> dict[int, int]:
        """Category code -> model index from the models' `category` keys; required for `choose`."""
        code_of = {c: i for i, c in enumerate(groups.categories)}
        out: dict[int, int] = {}
        for i, category in enumerate(self._categories):
            if category is None:
                continue
            if category not in code_of or category == GENERAL:
                raise MergeError(f"models[{i}].category: '{category}' is not a task category of {where} "
                                 f"(its categories: {', '.join(groups.categories[1:])})")
            out[code_of[category]] = i
        if specific == "choose":
            for code, cat in enumerate(groups.categories[1:], start=1):
                if code not in out:
                    raise MergeError(f"models: with specific: choose, every task category of {where} needs the model "
                                     f"it takes its neurons from; no model has category '{cat}' (set models[i].category)")
        return out

    def _merged_codes(self, params: dict[str, Any], layer: int) -> torch.Tensor:
        """Boolean mask of the neurons of ``layer`` that ``general_method`` merges."""
        codes = self.context(params).groups.codes[layer]
        if params["specific"] == "merge":
            return torch.ones_like(codes, dtype=torch.bool)
        return codes == 0

    def _general_view(self, params: dict[str, Any]) -> View:
        def view(name: str, values: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor | None:
            slot = mlp_slot(name)
            if slot is None:
                return None
            merged = self._merged_codes(params, slot.layer)
            if rows is not None and slot.axis == 0:  # neurons are rows: those of the block
                merged = merged[rows[0]:rows[1]]
            idx = merged.nonzero().flatten().to(values.device)
            return values.index_select(slot.axis + 1, idx) if idx.numel() else None

        return view

    @staticmethod
    def _other_view(name: str, values: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor | None:
        return values if mlp_slot(name) is None else None

    def global_stats(self, params: dict[str, Any], num_tasks: int, device: torch.device) -> list[GlobalStat]:
        wrapped: list[ScopedStat] = []
        for scope, view in ((GENERAL_SCOPE, self._general_view(params)), (OTHER_SCOPE, self._other_view)):
            method = _delegate(params[f"{scope}_method"])
            # sub-tensor jobs elect over themselves: no per-tensor majority cached for blocks of rows; a global
            # majority sign over the scope is found in statistics reads (the merge read elects sub-tensors)
            inner = [MajoritySignStat(s.after) if isinstance(s, ModelMajorityStat) else s
                     for s in method.global_stats(params[f"{scope}_params"], num_tasks, device)
                     if isinstance(s, ModelMajorityStat) or not isinstance(s, TensorMajorityStat)]
            by_id = {id(s): ScopedStat(s, scope, view) for s in inner}
            for s in by_id.values():
                s.after = by_id[id(s.inner.after)] if s.inner.after is not None else None
            wrapped.extend(by_id.values())
        return list(wrapped)

    def merge(self, job: TensorJob, params: dict[str, Any]) -> TensorResult:
        slot = mlp_slot(job.name)
        if slot is None:
            result = self._delegate_merge(OTHER_SCOPE, job, job.base, job.deltas, params)
            return TensorResult(result.delta, {"group": "other", **result.stats})
        return self._merge_mlp(job, slot, params)

    def _delegate_merge(self, scope: str, job: TensorJob, base: torch.Tensor, deltas: torch.Tensor,
                        params: dict[str, Any]) -> TensorResult:
        prefix = f"{scope}/"
        stats = {k.removeprefix(prefix): s.inner for k, s in job.stats.items()
                 if k.startswith(prefix) and isinstance(s, ScopedStat)}
        sub = TensorJob(job.name, job.role, base, deltas, job.weights, stats, job.seed)
        return _delegate(params[f"{scope}_method"]).merge(sub, params[f"{scope}_params"])

    def _merge_mlp(self, job: TensorJob, slot: MlpSlot, params: dict[str, Any]) -> TensorResult:
        context = self.context(params)
        codes = context.groups.codes[slot.layer].to(job.base.device)
        delta = torch.zeros_like(job.base)
        stats: dict[str, Any] = {"group": "mlp"}
        merged = self._merged_codes(params, slot.layer).to(job.base.device)
        idx = merged.nonzero().flatten()
        if idx.numel():
            result = self._delegate_merge(GENERAL_SCOPE, job, job.base.index_select(slot.axis, idx),
                                          job.deltas.index_select(slot.axis + 1, idx), params)
            delta.index_copy_(slot.axis, idx, result.delta)
            stats.update(result.stats)
        if params["specific"] == "choose":
            for code, task in context.task_of_code.items():
                idx = (codes == code).nonzero().flatten()
                if idx.numel():
                    delta.index_copy_(slot.axis, idx, job.deltas[task].index_select(slot.axis, idx))
        cats = context.groups.categories
        stats["neurons"] = dict(zip(cats, torch.bincount(codes.cpu(), minlength=len(cats)).tolist()))
        return TensorResult(delta, stats)

    def report(self, params: dict[str, Any], stats: dict[str, GlobalStat]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for scope in (GENERAL_SCOPE, OTHER_SCOPE):
            prefix = f"{scope}/"
            inner = {k.removeprefix(prefix): s.inner for k, s in stats.items()
                     if k.startswith(prefix) and isinstance(s, ScopedStat)}
            out[f"{scope}_method"] = {"method": params[f"{scope}_method"],
                                      **_delegate(params[f"{scope}_method"]).report(params[f"{scope}_params"], inner)}
        groups = self.context(params).groups
        out["groups"] = {"file": params["groups"], "categories": groups.categories, "totals": groups.totals(),
                         "random_groups": params["random_groups"], "specific": params["specific"]}
        return out


def _delegate(name: str) -> Method:
    from . import get_method  # the registry imports this module

    return get_method(name)
