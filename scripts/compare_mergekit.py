"""Agreement with mergekit: the same merges with both tools, compared entry by entry.

    python scripts/compare_mergekit.py --size small --tasks 3 --scratch /tmp/nmbench

Builds (or reuses) the benchmark's synthetic Llama checkpoints (bfloat16, see bench_engine.py) and
mergekit's throwaway virtualenv, then merges with linear, task_arithmetic and ties (per-tensor trim,
mergekit's only scope). mergekit computes in float32 (``dtype: float32``, ``out_dtype: bfloat16``),
as neuromerge does; with ``dtype: bfloat16`` it would compute in bfloat16 and differ by that rounding.

For every method it prints the share of output entries that are bit-identical and the largest
difference in bfloat16 units in the last place (ulp). TIES differs by the SPEC at two kinds of
coordinates, which the script finds independently from the inputs and counts:
- *threshold ties*: an entry whose |τ| equals its tensor's k-th largest while more than k entries
  reach it: neuromerge keeps them all, mergekit keeps k of them (by argsort order);
- *zero sums*: Σ_t of the kept τ_t is exactly 0 with some kept τ_t ≠ 0: neuromerge elects the
  tensor's majority sign, mergekit elects +1 (the same when the tensor's majority is +1).
Every other differing entry is listed as unexplained (expected: none).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import ROOT, SIZES, build_family, ensure_mergekit  # noqa: E402


def neuromerge_recipe(method: str, models: list[Path], density: float) -> dict:
    recipe = {"base_model": str(models[0]), "models": [{"model": str(m)} for m in models[1:]],
              "method": method, "dtype": "bfloat16"}
    if method == "ties":
        recipe["parameters"] = {"density": density, "mask_scope": "tensor"}
    return recipe


def mergekit_config(method: str, models: list[Path], density: float) -> dict:
    params = {"weight": 1.0, **({"density": density} if method == "ties" else {})}
    cfg = {"merge_method": method, "dtype": "float32", "out_dtype": "bfloat16",
           "models": [{"model": str(m), "parameters": params} for m in models[1:]]}
    if method != "linear":
        cfg["base_model"] = str(models[0])
    return cfg


def load(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a − b| in bfloat16 units in the last place, by the order of the bit patterns (int64)."""
    def key(x: torch.Tensor) -> torch.Tensor:
        bits = x.contiguous().view(torch.int16).to(torch.int64)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)  # sign-magnitude → a monotone integer line
    return (key(a) - key(b)).abs()


def ties_causes(base: torch.Tensor, tasks: list[torch.Tensor], density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(threshold ties, zero sums): boolean masks over the tensor's coordinates (see the module doc)."""
    b = base.float().reshape(-1)
    tau = torch.stack([t.float().reshape(-1) - b for t in tasks])
    n = tau.shape[1]
    k = max(1, math.floor(density * n))
    mags = tau.abs()
    thr = mags.topk(k, dim=1).values[:, -1:]
    kept = mags >= thr
    crowded = kept.sum(1, keepdim=True) > k
    at_threshold = ((mags == thr) & crowded).any(0)
    masked = torch.where(kept, tau, 0.0)
    zero_sum = (masked.sum(0) == 0) & (masked != 0).any(0)
    return at_threshold.reshape(base.shape), zero_sum.reshape(base.shape)


def compare(method: str, ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor],
            inputs: list[dict[str, torch.Tensor]], density: float) -> dict:
    total = same = 0
    worst = 0
    ties = {"threshold_ties": 0, "zero_sums": 0, "unexplained": 0, "unexplained_max_ulp": 0}
    for name, a in ours.items():
        b = theirs[name]
        d = ulps(a, b)
        total += d.numel()
        same += int((d == 0).sum())
        worst = max(worst, int(d.max()) if d.numel() else 0)
        if method == "ties" and bool((d > 0).any()):
            at_thr, zero = ties_causes(inputs[0][name], [m[name] for m in inputs[1:]], density)
            differ = d > 0
            ties["threshold_ties"] += int((differ & at_thr).sum())
            ties["zero_sums"] += int((differ & zero & ~at_thr).sum())
            other = differ & ~at_thr & ~zero
            ties["unexplained"] += int(other.sum())
            if bool(other.any()):
                ties["unexplained_max_ulp"] = max(ties["unexplained_max_ulp"], int(d[other].max()))
    row = {"entries": total, "identical": same / total, "max_ulp": worst}
    return {**row, **ties} if method == "ties" else row


def run(cmd: list[str], cwd: Path | None = None) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd[:3])} … failed:\n{done.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/nmbench"))
    ap.add_argument("--mergekit-venv", type=Path, help="its virtualenv (default: SCRATCH/mergekit-venv)")
    ap.add_argument("--methods", default="linear,task_arithmetic,ties")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if ROOT in args.scratch.resolve().parents:
        ap.error("--scratch must be outside the repository")
    import yaml

    work = args.scratch / f"{args.size}-T{args.tasks}"
    models = build_family(work / "models", SIZES[args.size], args.tasks, 1 << 30)
    mergekit = ensure_mergekit(args.mergekit_venv or args.scratch / "mergekit-venv")
    inputs = [load(m) for m in models]
    results = {}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        recipe, cfg = work / f"agree-{method}.yaml", work / f"agree-mergekit-{method}.yaml"
        recipe.write_text(yaml.safe_dump(neuromerge_recipe(method, models, args.density)))
        cfg.write_text(yaml.safe_dump(mergekit_config(method, models, args.density)))
        ours, theirs = work / f"agree-out-{method}-neuromerge", work / f"agree-out-{method}-mergekit"
        run([sys.executable, "-m", "neuromerge_cli", "run", str(recipe), "-o", str(ours), "--overwrite", "-q"], cwd=ROOT)
        run([str(mergekit), str(cfg), str(theirs), "--allow-crimes"])
        results[method] = compare(method, load(ours), load(theirs), inputs, args.density)
        print(f"{method}: {results[method]}", file=sys.stderr, flush=True)

    print(f"\n{args.size} ({sum(t.numel() for t in inputs[0].values()) / 1e6:.0f}M parameters, T={args.tasks}, bf16), "
          f"mergekit computing in float32")
    print(f"{'method':<16} {'identical':>10} {'max ulp':>8} {'threshold ties':>15} {'zero sums':>10} {'unexplained':>12}")
    for method, r in results.items():
        extra = (f"{r['threshold_ties']:>15,} {r['zero_sums']:>10,} {r['unexplained']:>12,}" if method == "ties"
                 else f"{'-':>15} {'-':>10} {'-':>12}")
        print(f"{method:<16} {r['identical']:>10.6%} {r['max_ulp']:>8} {extra}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
