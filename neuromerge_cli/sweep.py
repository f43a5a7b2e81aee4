"""`neuromerge sweep`: merge over a parameter grid, score each point with a user command, keep the best.

Points that differ only in the method's scale parameters (λ, λ1, λ2, …) share one merge pass: the
tensors' parts are computed once and each point is written from them (engine.merge_variants).
"""

from __future__ import annotations

import itertools
import json
import math
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import yaml

from .engine import MergeOptions, Prepared, Variant, merge_variants
from .errors import MergeError
from .recipe import Recipe, parse_recipe

KEEP = ("all", "best", "none")


@dataclass
class Point:
    """One grid point: its parameter values, where it was written, and its score."""

    index: int
    values: dict[str, Any]
    output: Path
    score: float | None = None


@dataclass
class SweepResult:
    points: list[Point]
    best: Point
    best_recipe: Path
    merges: int  # merge passes run (one per combination of non-scale values)
    details: dict[str, Any] = field(default_factory=dict)


def _frange(start: float, stop: float, step: float) -> list[float]:
    if step <= 0 or stop < start:
        raise ValueError("expected START:STOP:STEP with STEP > 0 and STOP >= START")
    count = int(math.floor((stop - start) / step + 1e-9)) + 1
    return [round(start + i * step, 10) for i in range(count)]


def parse_grid(specs: list[str]) -> dict[str, list[Any]]:
    """``name=START:STOP:STEP`` (inclusive) or ``name=v1,v2,...`` → {name: values}, in given order."""
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        name, sep, body = spec.partition("=")
        name = name.strip()
        if not sep or not name or not body.strip():
            raise MergeError(f"--grid {spec!r}: expected NAME=START:STOP:STEP or NAME=V1,V2,...")
        if name in grid:
            raise MergeError(f"--grid {name}: given twice")
        try:
            if ":" in body:
                start, stop, step = (float(x) for x in body.split(":"))
                values: list[Any] = _frange(start, stop, step)
            else:
                values = [yaml.safe_load(v.strip()) for v in body.split(",")]
        except (ValueError, yaml.YAMLError) as exc:
            raise MergeError(f"--grid {spec!r}: {exc}") from None
        grid[name] = values
    if not grid:
        raise MergeError("--grid: give at least one NAME=VALUES")
    return grid


def _with_params(recipe: Recipe, values: dict[str, Any]) -> Recipe:
    """The recipe with some parameters replaced, validated like a recipe file."""
    raw = {**recipe.raw, "parameters": {**(recipe.raw.get("parameters") or {}), **values}}
    return parse_recipe(raw)


def score_of(command: str, output: Path) -> float:
    """Run the evaluation command for one merged folder; its last output line is the score."""
    cmd = command.replace("{output}", shlex.quote(str(output)))
    try:
        done = subprocess.run(cmd, shell=True, stdout=subprocess.PIPE, text=True)
    except OSError as exc:
        raise MergeError(f"--eval: cannot run {cmd!r} ({exc})") from None
    if done.returncode != 0:
        raise MergeError(f"--eval: {cmd!r} exited with status {done.returncode}")
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    try:
        score = float(lines[-1].split()[-1])
    except (IndexError, ValueError):
        last = lines[-1] if lines else "(no output)"
        raise MergeError(f"--eval: {cmd!r} must print a score as its last line, got {last!r}") from None
    if not math.isfinite(score):
        raise MergeError(f"--eval: {cmd!r} printed a non-finite score {score}")
    return score


def run_sweep(prepared: Prepared, grid: dict[str, list[Any]], evaluate: str, workdir: Path,
              options: MergeOptions, keep: str = "best", maximize: bool = True,
              on_point: Callable[[Point], None] | None = None) -> SweepResult:
    """Merge every grid point (sharing passes across scale parameters), score them, keep the best."""
    recipe, method = prepared.recipe, prepared.method
    known = [p.name for p in method.params]
    for name in grid:
        if name not in known:
            raise MergeError(f"--grid {name}: method '{method.name}' takes no parameter '{name}' "
                             f"(allowed: {', '.join(known) or 'none'})")
    if keep not in KEEP:
        raise MergeError(f"--keep: expected one of {', '.join(KEEP)}, got {keep!r}")
    scale_names = [n for n in grid if n in method.scale_params]
    other_names = [n for n in grid if n not in method.scale_params]
    workdir.mkdir(parents=True, exist_ok=True)
    points: list[Point] = []
    best: Point | None = None
    merges = 0
    for other in itertools.product(*(grid[n] for n in other_names)):
        fixed = dict(zip(other_names, other))
        base_recipe = _with_params(recipe, fixed)
        group: list[Point] = []
        for scales in itertools.product(*(grid[n] for n in scale_names)):
            values = {**fixed, **dict(zip(scale_names, scales))}
            _with_params(recipe, values)  # validates every value before any work
            group.append(Point(len(points) + len(group), values, workdir / f"point-{len(points) + len(group):03d}"))
        variants = [Variant(p.output, {n: p.values[n] for n in scale_names}) for p in group]
        merge_variants(replace(prepared, recipe=base_recipe), options, variants)
        merges += 1
        for p in group:
            p.score = score_of(evaluate, p.output)
            if best is None or (p.score > best.score if maximize else p.score < best.score):  # type: ignore[operator]
                if best is not None and keep != "all":
                    shutil.rmtree(best.output, ignore_errors=True)
                best = p
            elif keep != "all":
                shutil.rmtree(p.output, ignore_errors=True)
            if on_point:
                on_point(p)
        points.extend(group)
    assert best is not None
    if keep == "none":
        shutil.rmtree(best.output, ignore_errors=True)
    best_raw = {**recipe.raw, "parameters": {**(recipe.raw.get("parameters") or {}), **best.values}}
    best_recipe = workdir / "best.yaml"
    best_recipe.write_text(yaml.safe_dump(best_raw, sort_keys=False))
    summary = {"grid": grid, "maximize": maximize, "evaluate": evaluate, "merge_passes": merges,
               "points": [{"values": p.values, "score": p.score, "output": str(p.output)} for p in points],
               "best": {"values": best.values, "score": best.score, "output": str(best.output)}}
    (workdir / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    return SweepResult(points, best, best_recipe, merges, summary)
