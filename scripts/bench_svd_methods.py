"""Time and peak memory of the SVD methods (tsv, iso_c, iso_cts) on one large matrix.

Each method runs in its own process on random task vectors (T, M, N) in float32 on the CPU; the
table shows the wall time of the merge kernel and its peak RSS above the inputs (in units of one
M×N float32 matrix, so the figure carries over to other shapes).

    python scripts/bench_svd_methods.py --shape 8192 2048 --tasks 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("tsv", "iso_c", "iso_cts")


def rss_bytes() -> int:
    """Current resident set size (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def measure(method: str, rows: int, cols: int, tasks: int, dtype: str) -> dict[str, float]:
    """Run one merge kernel in this process; peak RSS above the inputs."""
    import torch

    sys.path.insert(0, str(ROOT))
    from neuromerge_cli.methods import TensorJob, get_method

    torch.manual_seed(0)
    deltas = torch.randn(tasks, rows, cols) * 0.01
    base = torch.zeros(rows, cols)
    before = rss_bytes()
    m = get_method(method)
    job = TensorJob("w", "neuron", base, deltas, torch.ones(tasks))
    t0 = time.perf_counter()
    delta = m.merge(job, m.parse_params({"svd_dtype": dtype})).delta
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert delta.shape == (rows, cols)
    return {"seconds": seconds, "extra_peak_bytes": max(0, peak - before)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=(8192, 2048), metavar=("M", "N"))
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    rows, cols = args.shape
    if args.one:
        print(json.dumps(measure(args.one, rows, cols, args.tasks, args.dtype)))
        return
    matrix = rows * cols * 4
    # Freed matrices go back to the OS at once, so that peak RSS tracks live memory rather than
    # glibc heap reuse (which only matrices under its 32 MiB mmap threshold would see).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    print("| method | shape | T | svd_dtype | kernel time (s) | peak RSS above inputs (GiB) | in M×N float32 matrices |")
    print("|---|---|---|---|---|---|---|")
    for method in METHODS:
        out = subprocess.run([sys.executable, __file__, "--one", method, "--shape", str(rows), str(cols),
                              "--tasks", str(args.tasks), "--dtype", args.dtype],
                             check=True, capture_output=True, text=True, env=env).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"| {method} | {rows}×{cols} | {args.tasks} | {args.dtype} | {r['seconds']:.1f} | "
              f"{r['extra_peak_bytes'] / 2**30:.2f} | {r['extra_peak_bytes'] / matrix:.1f} |")


if __name__ == "__main__":
    main()
