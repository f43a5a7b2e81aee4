"""`neuromerge run --dry-run`: what a merge would read, write and hold in memory, from headers only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import kernels
from .engine import (PREFETCH, PREFETCH_BYTES, Piece, Prepared, pick_device, pieces, reads_whole, sample_pieces,
                     schedule)
from .memory import HEAP_SLACK
from .plan import Plan
from .units import format_bytes

# The float32 base + task vectors and the method's temporaries (magnitudes, masks, elections, parts,
# histogram bins in the statistics passes), as a multiple of (T+1) × the largest piece × 4 bytes.
# Measured on CPU (4 tensors of 2048×2048, T = 3; peak RSS minus the ~260 MB of an idle run):
# task_arithmetic ≈ 4, ties ≈ 7.6 (scripts/dryrun_memory.py). The larger, rounded up, is used.
WORKSPACE_FACTOR = 8
# A statistics pass over the stored inputs (per-tensor trim thresholds) holds, for one whole tensor,
# θ0 and one task's |τ_t| in float32 and the selection's masks: a multiple of the tensor × 4 bytes.
STORED_FACTOR = 3


def memory_estimate(prepared: Prepared, device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    """Expected peak memory beyond the interpreter: the largest, over the statistics reads and the
    merge read, of the pieces in flight plus the working set of the largest piece.

    A read goes over pieces (tensors, or blocks of rows for a method or statistic that streams rows;
    see engine.pieces; on ``device``). in_flight: the piece being merged plus the read-ahead (PREFETCH pieces within
    PREFETCH_BYTES, at least one), base and tasks in their storage dtype. working: the largest piece
    as float32, base plus T task vectors, times WORKSPACE_FACTOR (STORED_FACTOR × one tensor for a pass
    over the stored inputs), on the compute device; a merge read that statistics observe (in_merge_read)
    reads whole tensors and holds the larger of the two working sets. heap_slack: what the allocator may hold in freed
    blocks before it hands them back (HeapGuard).
    """
    plan, recipe, method = prepared.plan, prepared.recipe, prepared.method
    tasks = len(prepared.tasks)
    stats = method.global_stats(recipe.params, tasks, torch.device("cpu"))
    merged = [t.name for t in plan.merged]
    # (phase, tensors read, read in blocks of rows, observed as stored, merged in blocks of rows or None)
    reads = [(f"statistics read {g + 1}", merged, all(s.rowwise for s, _ in active),
              any(s.stored_inputs for s, _ in active), None) for g, active in enumerate(schedule(stats))]
    unique = [t.name for t in plan.tensors if t.alias_of is None]
    rowwise = method.rowwise(recipe.params)
    reads.append(("merge read", unique, rowwise and not reads_whole(rowwise, stats),
                  any(s.stored_inputs for s in stats if s.in_merge_read), rowwise))
    best: dict[str, Any] = {}
    for phase, names, read_rowwise, stored, merge_rowwise in reads:
        work = pieces(plan, names, read_rowwise, device=device)
        if not work:
            continue
        sizes = sorted((prepared.piece_bytes(p) for p in work), reverse=True)
        ahead = max(sizes[0], min(sum(sizes[:PREFETCH + 1]), PREFETCH_BYTES))
        in_flight = sizes[0] + ahead
        candidates = []  # (working bytes, piece, its values, observed as stored)
        if stored or merge_rowwise is None:
            largest, numel = _largest(plan, work)
            candidates.append((numel * 4 * (STORED_FACTOR if stored else (tasks + 1) * WORKSPACE_FACTOR),
                               largest, numel, stored))
        if merge_rowwise is not None:
            largest, numel = _largest(plan, pieces(plan, names, merge_rowwise, device=device))
            candidates.append((numel * 4 * (tasks + 1) * WORKSPACE_FACTOR, largest, numel, False))
        working, largest, numel, as_stored = max(candidates, key=lambda c: c[0])
        if not best or in_flight + working > best["in_flight_bytes"] + best["working_bytes"]:
            best = {"phase": phase, "in_flight_bytes": in_flight, "working_bytes": working,
                    "largest_tensor": largest.name if largest else None, "largest_rows": largest.rows if largest else None,
                    "largest_numel": numel, "stored_inputs": as_stored}
    return {"in_flight_bytes": 0, "working_bytes": 0, "largest_tensor": None, "largest_rows": None, "largest_numel": 0,
            "phase": "merge read", "stored_inputs": False, **best, "heap_slack_bytes": HEAP_SLACK,
            "prefetch": PREFETCH, "workspace_factor": WORKSPACE_FACTOR, "stored_factor": STORED_FACTOR}


def _largest(plan: Plan, work: list[Piece]) -> tuple[Piece | None, int]:
    """The merged (not copied) piece of ``work`` with the most values, and their number."""
    by_name = plan.by_name()
    merging = [p for p in work if by_name[p.name].role != "copy"]
    largest = max(merging, key=lambda p: _piece_numel(by_name[p.name].shape, p), default=None)
    return largest, _piece_numel(by_name[largest.name].shape, largest) if largest is not None else 0


def _piece_numel(shape: tuple[int, ...], piece: Piece) -> int:
    return piece.share(_numel(shape), shape)


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
    sampled = [s for s in stats if s.samples]
    sample = sample_pieces(plan, [t.name for t in plan.merged]) if sampled else []
    if not sample:
        for s in sampled:  # nothing to sample: the reads a statistic takes without one
            s.end_sample()
    statistics_reads = len(schedule(stats))
    stat_bytes = sum(prepared.read_bytes(t.name) for t in plan.merged)
    merge_bytes = sum(prepared.read_bytes(t.name) for t in plan.tensors if t.alias_of is None)
    roles = {role: sum(1 for t in plan.tensors if t.role == role) for role in ("neuron", "point", "copy")}
    return {
        "method": recipe.method,
        "base": recipe.base_model,
        "models": [m.model for m in recipe.models],
        "sample_rows": sum(p.rows[1] - p.rows[0] for p in sample if p.rows),
        "device": str(pick_device(device)),
        "cpu_sweeps": kernels.cpu_sweeps() if pick_device(device).type == "cpu" else None,
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
        "memory": memory_estimate(prepared, pick_device(device)),
    }


def _piece_label(mem: dict[str, Any]) -> str:
    rows = mem["largest_rows"]
    return f"{mem['largest_tensor']}" + (f" rows {rows[0]}–{rows[1]}" if rows else "")


def plan_lines(d: dict[str, Any]) -> list[str]:
    """The dry-run plan for a person."""
    mem = d["memory"]
    roles = d["roles"]
    ties = d["tie_candidates"]
    lines = [
        f"dry run: {d['method']} over {len(d['models'])} model(s) of {d['base']} on {d['device']}"
        + (f" with {d['cpu_sweeps']}" if d["cpu_sweeps"] else "") + " (no weight read)",
        f"tensors: {d['tensors']} ({roles['neuron']} neuron, {roles['point']} point, {roles['copy']} copied)"
        + (f"; {len(ties)} group(s) of possibly tied weights ({', '.join('='.join(g) for g in ties)}), "
           "merged once if their bytes are equal, checked when the merge runs" if ties else ""),
        f"passes: {d['statistics_reads']} statistics read(s) + 1 merge read of the base and every model"
        + (f", after a sample of {d['sample_rows']} rows (a statistics read more for each statistic whose aim it misses)"
           if d["sample_rows"] else ""),
        f"read: {format_bytes(d['bytes_read'])} ({format_bytes(d['bytes_read_statistics'])} for statistics, "
        f"{format_bytes(d['bytes_read_merge'])} for the merge)",
        f"write: {format_bytes(d['bytes_written'])} in {d['shards']} shard(s) to {d['output']}",
        f"peak memory (estimate, {mem['phase']}): {format_bytes(mem['in_flight_bytes'])} of inputs in flight "
        f"(the piece being merged + up to {mem['prefetch']} read ahead, base and models in storage dtype) + "
        f"{format_bytes(mem['working_bytes'])} working set on {d['device']} (largest piece "
        f"{_piece_label(mem)}, {mem['largest_numel']:,} values × "
        + (f"float32 × {mem['stored_factor']}" if mem["stored_inputs"] else
           f"{len(d['models']) + 1} × float32 × {mem['workspace_factor']}")
        + f") + up to {format_bytes(mem['heap_slack_bytes'])} of freed heap, plus the interpreter (~260 MB)",
    ]
    if d["push"]:
        lines.append(f"then push to the Hub: {d['push']}")
    return lines
