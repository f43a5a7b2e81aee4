"""One merge: resolve → index → plan → statistics passes → merge pass → atomic finalize."""

from __future__ import annotations

import contextlib
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from .checkpoints import Checkpoint, Source, open_checkpoint, resolve
from .errors import MergeError
from .methods import Method, TensorJob, get_method
from .methods.common import tensor_seed
from .plan import Plan, TensorPlan, make_plan
from .recipe import Recipe
from .stats import GlobalStat
from .writer import ShardWriter, atomic_folder, check_free_space, check_output_location, signals_as_exceptions

DEFAULT_SHARD_SIZE = 5 * 1024**3
PREFETCH = 2

Progress = Callable[[str, int, int, int, int], None]
"""(phase, tensors done, tensors in the pass, bytes read so far, bytes the pass reads): called with
done = 0 when a pass starts, then after every tensor."""


@dataclass
class MergeOptions:
    output: Path
    device: str = "auto"
    overwrite: bool = False
    shard_size: int = DEFAULT_SHARD_SIZE
    allow_nonfinite: bool = False
    progress: Progress | None = None


@dataclass
class Prepared:
    """A recipe whose inputs are resolved, indexed and planned (no weights read for merging)."""

    recipe: Recipe
    method: Method
    base: Checkpoint
    tasks: list[Checkpoint]
    plan: Plan
    timings: dict[str, float] = field(default_factory=dict)

    def read_bytes(self, name: str) -> int:
        """Bytes that reading tensor ``name`` from the base and every task takes."""
        return sum(ck.tensors[name].nbytes for ck in (self.base, *self.tasks))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MergeError("--device cuda: no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise MergeError(f"--device: expected auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def prepare(recipe: Recipe, shard_size: int = DEFAULT_SHARD_SIZE, read_weights: bool = True) -> Prepared:
    """Resolve and index every checkpoint and plan the output.

    ``read_weights=False`` (a dry run) downloads nothing and reads no weight: Hub ids must be in
    the cache, and tied weights stay unconfirmed (see plan.make_plan)."""
    t0 = time.perf_counter()
    sources: list[Source] = [resolve(r, read_weights) for r in (recipe.base_model, *(m.model for m in recipe.models))]
    t1 = time.perf_counter()
    base, *tasks = [open_checkpoint(s) for s in sources]
    plan = make_plan(base, tasks, recipe.torch_dtype, shard_size, compare_ties=read_weights)
    method = get_method(recipe.method)
    method.bind(recipe, plan)
    t2 = time.perf_counter()
    return Prepared(recipe, method, base, tasks, plan,
                    {"resolve_s": t1 - t0, "index_and_plan_s": t2 - t1})


class TensorLoader:
    """Reads base and task tensors, a few tensors ahead of the consumer on a background thread."""

    def __init__(self, prepared: Prepared, device: torch.device, allow_nonfinite: bool) -> None:
        self.checkpoints = [prepared.base, *prepared.tasks]
        self.device = device
        self.allow_nonfinite = allow_nonfinite
        self._checked: set[str] = set()

    def _read(self, name: str) -> list[torch.Tensor]:
        tensors = [ck.read(name) for ck in self.checkpoints]
        if not self.allow_nonfinite and name not in self._checked and tensors[0].dtype.is_floating_point:
            for ck, t in zip(self.checkpoints, tensors):
                if not bool(torch.isfinite(t).all()):
                    raise MergeError(f"{ck.source.reference}: tensor '{name}' contains NaN or Inf "
                                     "(use --allow-nonfinite to merge anyway)")
            self._checked.add(name)
        return tensors

    def stream(self, names: Iterable[str]) -> Iterator[tuple[str, list[torch.Tensor]]]:
        """(name, [base, task_1..task_T] as stored, on the CPU), read ahead of use."""
        names = list(names)
        with ThreadPoolExecutor(max_workers=1) as pool:
            futures = [pool.submit(self._read, n) for n in names[:PREFETCH]]
            for i, name in enumerate(names):
                tensors = futures[i].result()
                if i + PREFETCH < len(names):
                    futures.append(pool.submit(self._read, names[i + PREFETCH]))
                futures[i] = None  # type: ignore[call-overload]
                yield name, tensors

    def as_float(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(θ0, τ stacked (T, ...)) in float32 on the compute device."""
        base = tensors[0].to(self.device, non_blocking=True).float()
        tasks = torch.stack([t.to(self.device, non_blocking=True).float() for t in tensors[1:]])
        return base, tasks.sub_(base)


class PassProgress:
    """Reports one pass over tensors to a Progress callback: announced on creation, then tick(name)."""

    def __init__(self, progress: Progress | None, phase: str, prepared: Prepared, names: list[str]) -> None:
        self.progress, self.phase, self.prepared, self.total = progress, phase, prepared, len(names)
        self.done = self.bytes_done = 0
        self.bytes_total = sum(prepared.read_bytes(n) for n in names)
        if progress:
            progress(phase, 0, self.total, 0, self.bytes_total)

    def tick(self, name: str) -> None:
        self.done += 1
        self.bytes_done += self.prepared.read_bytes(name)
        if self.progress:
            self.progress(self.phase, self.done, self.total, self.bytes_done, self.bytes_total)


def schedule(stats: list[GlobalStat]) -> list[list[tuple[GlobalStat, int]]]:
    """Group statistics passes into reads of the model: [(stat, its pass index)] per read."""
    start: dict[int, int] = {}
    for s in stats:
        start[id(s)] = start[id(s.after)] + s.after.passes if s.after is not None else 0
    total = max((start[id(s)] + s.passes for s in stats), default=0)
    return [[(s, g - start[id(s)]) for s in stats if start[id(s)] <= g < start[id(s)] + s.passes]
            for g in range(total)]


def run_statistics(prepared: Prepared, stats: list[GlobalStat], loader: TensorLoader,
                   weights: torch.Tensor, progress: Progress | None) -> int:
    """Run every statistics pass; returns the number of reads of the model it took."""
    passes = schedule(stats)
    names = [t.name for t in prepared.plan.merged]
    for g, active in enumerate(passes):
        meter = PassProgress(progress, f"statistics pass {g + 1}/{len(passes)}", prepared, names)
        for name, tensors in loader.stream(names):
            _, deltas = loader.as_float(tensors)
            for stat, p in active:
                stat.observe(p, name, deltas, weights)
            meter.tick(name)
        for stat, p in active:
            stat.end_pass(p)
    return len(passes)


def _tensor_report(t: TensorPlan, deltas: torch.Tensor, extra: dict[str, Any]) -> dict[str, Any]:
    flat = deltas.reshape(deltas.shape[0], -1)
    return {
        "role": t.role, "shape": list(t.shape),
        "task_l1": [float(x) for x in flat.abs().sum(1).tolist()],
        "task_l2": [float(x) for x in flat.norm(dim=1).tolist()],
        **extra,
    }


@dataclass(frozen=True)
class Variant:
    """One output of a merge pass: a folder, and values for the method's scale parameters.

    Several variants share one read of the inputs and one computation of each tensor's parts; only
    the final scaled sum differs (a λ sweep).
    """

    output: Path
    scales: dict[str, Any] = field(default_factory=dict)


def _variant_recipe(recipe: Recipe, scales: dict[str, Any]) -> Recipe:
    if not scales:
        return recipe
    raw = {**recipe.raw, "parameters": {**(recipe.raw.get("parameters") or {}), **scales}}
    return replace(recipe, params={**recipe.params, **scales}, raw=raw)


def run_merge(prepared: Prepared, options: MergeOptions) -> dict[str, Any]:
    """Merge and publish ``options.output``; returns the report that was written with it."""
    return merge_variants(prepared, options, [Variant(options.output)])[0]


def merge_variants(prepared: Prepared, options: MergeOptions, targets: list[Variant]) -> list[dict[str, Any]]:
    """Merge once and publish one folder per variant; returns the report written with each."""
    from .report import build_report, metadata_bytes, write_metadata

    recipe, method, plan = prepared.recipe, prepared.method, prepared.plan
    if any(v.scales for v in targets):
        extra = sorted({k for v in targets for k in v.scales} - set(method.scale_params))
        if extra:
            raise MergeError(f"parameters.{extra[0]}: not a scale parameter of method '{method.name}' "
                             f"(scale parameters: {', '.join(method.scale_params) or 'none'})")
    recipes = [_variant_recipe(recipe, v.scales) for v in targets]
    device = pick_device(options.device)
    inputs = [prepared.base.path] + [t.path for t in prepared.tasks]
    for v in targets:
        check_output_location(v.output, inputs, options.overwrite)
    check_free_space([v.output for v in targets], plan.bytes_out + metadata_bytes(prepared.base.path))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    weights = torch.tensor([m.weight for m in recipe.models], dtype=torch.float32, device=device)
    loader = TensorLoader(prepared, device, options.allow_nonfinite)
    timings = dict(prepared.timings)
    tensor_stats: list[dict[str, dict[str, Any]]] = [{} for _ in targets]
    with contextlib.ExitStack() as stack:
        stack.enter_context(signals_as_exceptions())
        folders = [stack.enter_context(atomic_folder(v.output, options.overwrite)) for v in targets]
        t0 = time.perf_counter()
        stats = method.global_stats(recipe.params, len(recipe.models), device)
        reads = run_statistics(prepared, stats, loader, weights, options.progress)
        by_key = {s.key: s for s in stats}
        scales = [method.scales(r.params, by_key) for r in recipes] if method.scale_params else []
        t1 = time.perf_counter()
        writers = [ShardWriter(folder, plan) for folder in folders]
        try:
            aliases = {t.alias_of: [] for t in plan.tensors if t.alias_of}
            for t in plan.tensors:
                if t.alias_of:
                    aliases[t.alias_of].append(t.name)
            names = [t.name for t in plan.tensors if t.alias_of is None]
            by_name = plan.by_name()
            meter = PassProgress(options.progress, "merge", prepared, names)
            for name, tensors in loader.stream(names):
                t = by_name[name]
                if t.role == "copy":
                    outs = [tensors[0]] * len(targets)
                else:
                    base, deltas = loader.as_float(tensors)
                    job = TensorJob(name, t.role, base, deltas, weights, by_key,
                                    tensor_seed(recipe.params.get("seed", 0), name, -1))
                    if scales:
                        split = method.merge_parts(job, recipe.params)
                        merged, extra = [split.combine(s) for s in scales], split.stats
                    else:
                        result = method.merge(job, recipe.params)
                        merged, extra = [result.delta], result.stats
                    common = _tensor_report(t, deltas, extra)
                    outs = []
                    for k, delta in enumerate(merged):
                        outs.append((base + delta).to(t.dtype).cpu())
                        tensor_stats[k][name] = {**common, "delta_norm": float(delta.norm())}
                for writer, out in zip(writers, outs):
                    writer.write(name, out)
                    for alias in aliases.get(name, ()):
                        writer.write(alias, out)
                meter.tick(name)
            for writer in writers:
                writer.close()
        except BaseException:
            for writer in writers:
                writer.abort()
            raise
        t2 = time.perf_counter()
        timings.update({"statistics_s": t1 - t0, "merge_s": t2 - t1, "statistics_reads": reads})
        peak = {"rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        if device.type == "cuda":
            peak["cuda_bytes"] = torch.cuda.max_memory_allocated(device)
        reports = []
        for k, (folder, r) in enumerate(zip(folders, recipes)):
            variant = replace(prepared, recipe=r)
            report = build_report(variant, method.report(r.params, by_key), tensor_stats[k],
                                  str(device), timings, peak)
            write_metadata(folder, variant, report)
            reports.append(report)
    return reports
