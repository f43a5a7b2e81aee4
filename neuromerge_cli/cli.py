"""The `neuromerge` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import MergeError

app = typer.Typer(add_completion=True, no_args_is_help=True, rich_markup_mode=None,
                  help="Merge fine-tuned checkpoints of one base model into one multi-task model.")
out = Console()
err = Console(stderr=True)

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MiB', '1000000' → bytes."""
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1
    if unit not in SIZE_UNITS or value <= 0:
        raise MergeError(f"--shard-size: expected a size such as 5GB or 500MiB, got {text!r}")
    return int(value * SIZE_UNITS[unit])


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command; a user error becomes one line on stderr and exit code 1."""
    import functools

    from .writer import Interrupted

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MergeError as exc:
            err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except (Interrupted, KeyboardInterrupt) as exc:
            err.print(f"interrupted ({exc or 'SIGINT'}): nothing was written", markup=False, highlight=False)
            raise typer.Exit(130) from None

    return wrapper


@app.command()
@guarded
def run(
    recipe: Path = typer.Argument(..., help="YAML recipe."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder (default: the recipe's 'output')."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output once the new one is complete."),
    shard_size: str = typer.Option("5GB", "--shard-size", help="Largest output shard (e.g. 5GB, 500MiB)."),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="Merge inputs that contain NaN or Inf."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print nothing but errors."),
) -> None:
    """Merge the models of RECIPE into a new checkpoint folder.

    Example: neuromerge run recipes/demo.yaml --output merged/demo --overwrite
    """
    from .engine import MergeOptions, prepare, run_merge
    from .recipe import load_recipe
    from .report import summary_lines

    r = load_recipe(recipe)
    target = output if output is not None else (Path(r.output) if r.output else None)
    if target is None:
        raise MergeError("output: no output folder (give --output or set 'output' in the recipe)")
    size = parse_size(shard_size)
    prepared = prepare(r, size)
    progress = None if quiet else _progress_printer()
    report = run_merge(prepared, MergeOptions(target, device, overwrite, size, allow_nonfinite, progress))
    if not quiet:
        err.print()
        for line in summary_lines(report):
            out.print(line, markup=False, highlight=False, soft_wrap=True)
        out.print(f"wrote {target}", markup=False, highlight=False)


def _progress_printer() -> Callable[[str, int, int], None]:
    state = {"phase": ""}

    def show(phase: str, done: int, total: int) -> None:
        if not err.is_terminal:
            if phase != state["phase"]:
                err.print(f"{phase}: {total} tensors", markup=False, highlight=False)
                state["phase"] = phase
            return
        err.print(f"\r{phase}: {done}/{total}", end="", markup=False, highlight=False)
        if done == total:
            err.print()

    return show


@app.command()
@guarded
def sweep(
    recipe: Path = typer.Argument(..., help="YAML recipe (the grid overrides its parameters)."),
    grid: list[str] = typer.Option(..., "--grid", "-g", help="NAME=START:STOP:STEP (inclusive) or NAME=V1,V2,...; repeatable."),
    evaluate: str = typer.Option(..., "--eval", help="Command that scores a merged folder ({output} is replaced); its last output line is the score."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Where the points are merged (default: OUTPUT-sweep)."),
    keep: str = typer.Option("best", help="Merged folders to keep: all | best | none."),
    minimize: bool = typer.Option(False, "--minimize", help="Lower scores are better (default: higher)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace point folders left by an earlier sweep."),
    shard_size: str = typer.Option("5GB", "--shard-size", help="Largest output shard (e.g. 5GB, 500MiB)."),
) -> None:
    """Merge over a parameter grid, score every point with --eval, keep the best and write its recipe.

    Points that differ only in scale parameters (lambda, lambda1, lambda2, lambda_point) share one
    merge computation.

    Example: neuromerge sweep recipes/demo.yaml --grid lambda2=0.8:2.0:0.2 --grid density=0.1,0.15
    --eval "python scripts/quality_benchmark.py eval {output} --split validation"
    """
    from .engine import MergeOptions, prepare
    from .recipe import load_recipe
    from .sweep import parse_grid, run_sweep

    r = load_recipe(recipe)
    points = parse_grid(grid)
    root = workdir or Path((r.output or "merged").rstrip("/") + "-sweep")
    size = parse_size(shard_size)
    prepared = prepare(r, size)
    names = list(points)
    table = Table(show_edge=False)
    for col in (*names, "score"):
        table.add_column(col)

    def show(p: Any) -> None:
        err.print(f"point {p.index}: " + ", ".join(f"{k}={v}" for k, v in p.values.items()) + f" -> {p.score:.6g}",
                  markup=False, highlight=False)
        table.add_row(*(str(p.values[n]) for n in names), f"{p.score:.6g}")

    result = run_sweep(prepared, points, evaluate, root, MergeOptions(root, device, overwrite, size),
                       keep, not minimize, show)
    out.print(table)
    kept = f", merged at {result.best.output}" if keep != "none" else ""
    out.print(f"best: " + ", ".join(f"{k}={v}" for k, v in result.best.values.items()) +
              f" (score {result.best.score:.6g}){kept}", markup=False, highlight=False)
    out.print(f"{len(result.points)} points from {result.merges} merge pass(es); best recipe: {result.best_recipe}",
              markup=False, highlight=False)


@app.command()
@guarded
def validate(recipe: Path = typer.Argument(..., help="YAML recipe.")) -> None:
    """Check a recipe and its checkpoints' compatibility without merging.

    Example: neuromerge validate recipes/demo.yaml
    """
    from .engine import prepare
    from .recipe import load_recipe

    r = load_recipe(recipe)
    p = prepare(r)
    counts = {role: sum(1 for t in p.plan.tensors if t.role == role) for role in ("neuron", "point", "copy")}
    out.print(f"ok: {r.method} over {len(r.models)} models of {r.base_model}; {len(p.plan.tensors)} tensors "
              f"({counts['neuron']} neuron, {counts['point']} point, {counts['copy']} copied), "
              f"{len(p.plan.tied)} tied, {len(p.plan.shards)} output shard(s)", markup=False, highlight=False)


@app.command()
def methods() -> None:
    """List every merge method with its parameters, defaults and meaning.

    Example: neuromerge methods
    """
    from .methods import METHODS

    for cls in METHODS.values():
        out.print(f"{cls.name}: {cls.summary}", markup=False, highlight=False)
        table = Table(show_edge=False, box=None, padding=(0, 2))
        for col in ("parameter", "default", "values", "meaning"):
            table.add_column(col)
        for p in cls.params:
            table.add_row(p.name, str(p.default), p.kind, p.help)
        if not cls.params:
            table.add_row("(none)", "", "", "")
        out.print(table)
        out.print()


@app.command()
@guarded
def inspect(model: str = typer.Argument(..., help="Local folder or Hub id[@revision].")) -> None:
    """Tensors, parameter count, dtypes, shards, neuron vs point parameters of a checkpoint.

    Example: neuromerge inspect ./checkpoints/base
    """
    from .checkpoints import open_checkpoint, resolve
    from .plan import role_of

    ck = open_checkpoint(resolve(model))
    files = sorted({str(i.file.name) for i in ck.tensors.values()})
    roles: dict[str, int] = {"neuron": 0, "point": 0, "copy": 0}
    dtypes: dict[str, int] = {}
    for info in ck.tensors.values():
        roles[role_of(info)] += info.numel
        key = str(info.dtype).removeprefix("torch.")
        dtypes[key] = dtypes.get(key, 0) + info.numel
    total = sum(roles.values())
    out.print(f"{model} -> {ck.path}" + (f" (revision {ck.source.revision})" if ck.source.revision else ""), markup=False)
    out.print(f"architecture: {(ck.config or {}).get('model_type', 'unknown')}; {len(ck.tensors)} tensors, "
              f"{total:,} parameters in {len(files)} file(s)", markup=False)
    out.print("dtypes: " + ", ".join(f"{k} {v:,}" for k, v in dtypes.items()), markup=False)
    out.print(f"neuron parameters {roles['neuron']:,}, point parameters {roles['point']:,}, "
              f"copied (integer) {roles['copy']:,}", markup=False)
    table = Table(show_edge=False)
    for col in ("tensor", "role", "dtype", "shape", "file"):
        table.add_column(col)
    for info in ck.tensors.values():
        table.add_row(info.name, role_of(info), str(info.dtype).removeprefix("torch."), str(list(info.shape)), info.file.name)
    out.print(table)


def version_callback(value: bool) -> None:
    if value:
        out.print(f"neuromerge {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True, help="Show the version."),
) -> None:
    """Merge fine-tuned checkpoints of one base model into one multi-task model."""


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
