"""`neuromerge run --dry-run`: what a merge would read, write and hold in memory, from headers only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .engine import PREFETCH, Prepared, pick_device, schedule
from .units import format_bytes

# The float32 base + task vectors and the method's temporaries (magnitudes, masks, elections, parts,
# histogram bins in the statistics passes), as a multiple of (T+1) × the largest tensor × 4 bytes.
# Measured on CPU (4 tensors of 2048×2048, T = 3; peak RSS minus the ~260 MB of an idle run):
# task_arithmetic ≈ 4, ties ≈ 7.6 (scripts/dryrun_memory.py). The larger, rounded up, is used.
WORKSPACE_FACTOR = 8


def memory_estimate(prepared: Prepared) -> dict[str, Any]:
    """Expected peak memory of the merge pass, beyond the interpreter itself.

    in_flight: the tensors read but not yet written — PREFETCH read ahead plus the one being merged,
    each from the base and every task in its storage dtype — taken as the PREFETCH + 1 largest reads.
    working: the largest tensor as float32, base plus T task vectors, times WORKSPACE_FACTOR for
    the method's temporaries; it lives on the compute device (GPU memory under CUDA).
    """
    plan = prepared.plan
    reads = sorted((prepared.read_bytes(t.name) for t in plan.tensors if t.alias_of is None), reverse=True)
    largest = max(plan.merged, key=lambda t: _numel(t.shape), default=None)
    numel = _numel(largest.shape) if largest is not None else 0
    tasks = len(prepared.tasks)
    in_flight = sum(reads[:PREFETCH + 1])
    working = (tasks + 1) * numel * 4 * WORKSPACE_FACTOR
    return {"in_flight_bytes": in_flight, "working_bytes": working, "largest_tensor": largest.name if largest else None,
            "largest_numel": numel, "prefetch": PREFETCH, "workspace_factor": WORKSPACE_FACTOR}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def describe(prepared: Prepared, device: str, output: Path, push: str | None = None) -> dict[str, Any]:
    """The plan of a merge as a JSON-able dict; reads no weight."""
    from .plan import tie_candidates

    recipe, plan = prepared.recipe, prepared.plan
    stats = prepared.method.global_stats(recipe.params, len(recipe.models), torch.device("cpu"))
    statistics_reads = len(schedule(stats))
    stat_bytes = sum(prepared.read_bytes(t.name) for t in plan.merged)
    merge_bytes = sum(prepared.read_bytes(t.name) for t in plan.tensors if t.alias_of is None)
    roles = {role: sum(1 for t in plan.tensors if t.role == role) for role in ("neuron", "point", "copy")}
    return {
        "method": recipe.method,
        "base": recipe.base_model,
        "models": [m.model for m in recipe.models],
        "device": str(pick_device(device)),
        "output": str(output),
        "push": push,
        "tensors": len(plan.tensors),
        "roles": roles,
        "tie_candidates": tie_candidates(prepared.base),
        "statistics_reads": statistics_reads,
        "reads": statistics_reads + 1,
        "bytes_read": statistics_reads * stat_bytes + merge_bytes,
        "bytes_read_statistics": statistics_reads * stat_bytes,
        "bytes_read_merge": merge_bytes,
        "bytes_written": plan.bytes_out,
        "shards": len(plan.shards),
        "memory": memory_estimate(prepared),
    }


def plan_lines(d: dict[str, Any]) -> list[str]:
    """The dry-run plan for a person."""
    mem = d["memory"]
    roles = d["roles"]
    ties = d["tie_candidates"]
    lines = [
        f"dry run: {d['method']} over {len(d['models'])} model(s) of {d['base']} on {d['device']} (no weight read)",
        f"tensors: {d['tensors']} ({roles['neuron']} neuron, {roles['point']} point, {roles['copy']} copied)"
        + (f"; {len(ties)} group(s) of possibly tied weights ({', '.join('='.join(g) for g in ties)}), "
           "merged once if their bytes are equal, checked when the merge runs" if ties else ""),
        f"passes: {d['statistics_reads']} statistics read(s) + 1 merge read of the base and every model",
        f"read: {format_bytes(d['bytes_read'])} ({format_bytes(d['bytes_read_statistics'])} for statistics, "
        f"{format_bytes(d['bytes_read_merge'])} for the merge)",
        f"write: {format_bytes(d['bytes_written'])} in {d['shards']} shard(s) to {d['output']}",
        f"peak memory (estimate): {format_bytes(mem['in_flight_bytes'])} of tensors in flight "
        f"({mem['prefetch']} read ahead + 1 merging, base and models in storage dtype) + "
        f"{format_bytes(mem['working_bytes'])} working set on {d['device']} (largest tensor "
        f"{mem['largest_tensor']}, {mem['largest_numel']:,} values × {len(d['models']) + 1} × float32 × "
        f"{mem['workspace_factor']}), plus the interpreter (~260 MB)",
    ]
    if d["push"]:
        lines.append(f"then push to the Hub: {d['push']}")
    return lines
