"""Compare `neuromerge run --dry-run`'s peak-memory estimate with the peak RSS of the real merge.

    python scripts/dryrun_memory.py [--size 2048] [--tensors 4] [--tasks 3] [--methods ties task_arithmetic] [--set mask_scope=tensor]

Builds float32 checkpoints of square tensors in a temporary folder, then for each method runs the
dry run and the merge in fresh processes and prints both. This process never imports torch: on
Linux a child's peak RSS (ru_maxrss) starts from its parent's at fork, so a big parent would
inflate the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20


def build(root: Path, size: int, tensors: int, tasks: int) -> None:
    """The base, ``tasks`` fine-tuned copies, and a tiny pair for the interpreter's own footprint."""
    sys.path.insert(0, str(ROOT / "tests"))
    import torch

    from helpers import write_model

    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(size, size, generator=g) for i in range(tensors)}
    write_model(root / "base", base)
    for t in range(tasks):
        write_model(root / f"task{t}", {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()})
    write_model(root / "tiny-base", {"w": torch.zeros(8, 8)})
    write_model(root / "tiny-task", {"w": torch.ones(8, 8)})


def run(root: Path, name: str, base: str, models: list[str], method: str, dry: bool,
        params: dict | None = None) -> dict:
    """A merge (or its plan) in a fresh process; returns the report (or the plan event)."""
    import yaml

    recipe = root / f"{name}.yaml"
    recipe.write_text(yaml.safe_dump({"base_model": str(root / base), "models": [str(root / m) for m in models],
                                      "method": method, "output": str(root / f"out-{name}"),
                                      **({"parameters": params} if params else {})}))
    cli = [sys.executable, "-m", "neuromerge_cli", "run", str(recipe), "--device", "cpu", "--json-log"]
    proc = subprocess.run(cli + (["--dry-run"] if dry else []), capture_output=True, text=True, check=True)
    if dry:
        return next(e for e in map(json.loads, proc.stderr.splitlines()) if e["event"] == "plan")
    return json.loads((root / f"out-{name}" / "merge_report.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--tensors", type=int, default=4)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["ties", "task_arithmetic"])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="method parameters, e.g. mask_scope=tensor")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build(args.build, args.size, args.tensors, args.tasks)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        subprocess.run([sys.executable, __file__, "--build", str(root), "--size", str(args.size),
                        "--tensors", str(args.tensors), "--tasks", str(args.tasks)], check=True)
        print(f"{args.tensors} tensors of {args.size}x{args.size} float32, T = {args.tasks}")
        idle = run(root, "tiny", "tiny-base", ["tiny-task"], "ties", False)["peak_memory"]["rss_bytes"]
        print(f"interpreter (a ties merge of one 8x8 tensor): peak RSS {idle / MIB:.0f} MiB")
        models = [f"task{t}" for t in range(args.tasks)]
        import yaml

        params = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
        for method in args.methods:
            mem = run(root, method, "base", models, method, True, params)["memory"]
            peak = run(root, method, "base", models, method, False, params)["peak_memory"]["rss_bytes"]
            estimate = mem["in_flight_bytes"] + mem["working_bytes"] + mem["heap_slack_bytes"] + idle
            print(f"{method} ({mem['phase']}): estimate {mem['in_flight_bytes'] / MIB:.0f} MiB in flight + "
                  f"{mem['working_bytes'] / MIB:.0f} MiB working set + {mem['heap_slack_bytes'] / MIB:.0f} MiB heap slack + "
                  f"{idle / MIB:.0f} MiB interpreter = {estimate / MIB:.0f} MiB; measured peak RSS {peak / MIB:.0f} MiB")


if __name__ == "__main__":
    main()
