"""Time NeuroMerging's neuron kernel alone (methods/subspaces.neuron_merge) next to a per-row SVD loop.

Two references, each timed on a subset of rows and extrapolated linearly to the whole tensor (said
so in the output): a straightforward per-row loop (project on w0, float64 SVD of the T×d orthogonal
parts, ψ over the coordinates), against which the kernel's rows are also checked, and the authors'
pattern (one batched SVD, then a Python loop over rows for the elections). On a CPU the speed-ups
compare CPU seconds of this process (steadier than wall time on a shared machine; use --threads 1
so that CPU time is compute time); on CUDA, wall time.

    nice python scripts/bench_neuromerging_kernel.py [--device cpu|cuda] [--ref-rows 256] [--repeat 2] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from neuromerge_cli.methods.elect import merge_values
from neuromerge_cli.methods.subspaces import COORD_RTOL, RANK_RTOL, TIE_RTOL, neuron_merge

SHAPES = ((4096, 4096), (11008, 4096))
TASKS = (3, 8)
DENSITY = 0.15


def make_inputs(out: int, width: int, tasks: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A base weight and T task vectors trimmed to ~15% (random keep mask: the kernel's cost doesn't depend on it)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(out, width, generator=g) * 0.02
    tau = torch.empty(tasks, out, width)
    for t in range(tasks):
        tau[t] = torch.randn(out, width, generator=g) * 1e-3
        tau[t] *= torch.rand(out, width, generator=g) < DENSITY
    return base.to(device), tau.to(device)


def per_row_reference(base: torch.Tensor, tau: torch.Tensor, weights: torch.Tensor, rows: int) -> torch.Tensor:
    """τ̄⊥ of the first ``rows`` rows, one float64 SVD per row (the same conventions as the kernel)."""
    out = torch.empty(rows, base.shape[1], dtype=torch.float64, device=base.device)
    w = weights.double()
    for k in range(rows):
        w0 = base[k].double()
        t = tau[:, k].double()
        n2 = w0 @ w0
        a = t @ w0 / n2 if n2 > 0 else torch.zeros(t.shape[0], dtype=torch.float64, device=t.device)
        p = t - a[:, None] * w0
        scale = t.norm()
        _, s, vh = torch.linalg.svd(p, full_matrices=False)
        v = vh[s > RANK_RTOL * scale].T
        c = p @ v
        c = torch.where(c.abs() > COORD_RTOL * scale, c, 0.0)
        wc = c * w[:, None]
        c = torch.where(wc.sum(0).abs() <= TIE_RTOL * wc.abs().sum(0), 0.0, c)
        out[k] = v @ merge_values(c, w, "elect_mean", majority=0.0)
    return out


def batched_svd_row_loop(base: torch.Tensor, tau: torch.Tensor, weights: torch.Tensor, rows: int) -> torch.Tensor:
    """The authors' pattern (ZzzitaoFang/NeuroMerging): one batched float32 SVD of all rows' (T, d)
    orthogonal parts, then a Python loop over rows for the elections and τ̄⊥ (timing only: no rank
    truncation and no guard for zero base rows, like theirs)."""
    w0 = base[:rows]
    t = tau[:, :rows]
    a = (t * w0).sum(2) / (w0 * w0).sum(1)
    p = (t - a.unsqueeze(2) * w0).permute(1, 0, 2)
    _, _, vh = torch.linalg.svd(p, full_matrices=False)
    coords = torch.matmul(p, vh.transpose(1, 2))  # (rows, T, T)
    out = []
    for k in range(rows):
        out.append(vh[k].T @ merge_values(coords[k], weights, "elect_mean"))
    return torch.stack(out)


def timed(fn, device: torch.device, repeat: int) -> tuple[float, float, object]:
    """(wall s, CPU s of this process, result) of the fastest of ``repeat`` runs."""
    best, result = (float("inf"), float("inf")), None
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - w0, time.process_time() - c0))
    return best[0], best[1], result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ref-rows", type=int, default=256, help="rows the per-row reference is timed on")
    ap.add_argument("--repeat", type=int, default=2, help="kernel runs per case (the best is reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, device {device} "
          f"({name}), {torch.get_num_threads()} CPU threads, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores")
    clock = "wall" if device.type == "cuda" else "CPU"
    print(f"| shape | T | kernel wall s | kernel CPU s | per-row SVD loop {clock} s | speed-up | "
          f"batched SVD + row loop {clock} s | speed-up | max |diff| / max |τ̄⊥| |")
    print("|---|---|---|---|---|---|---|---|---|")
    for out, width in SHAPES:
        for tasks in TASKS:
            base, tau = make_inputs(out, width, tasks, device)
            weights = torch.ones(tasks, device=device)
            neuron_merge(base[:64], tau[:, :64], weights, "elect_mean")  # warm-up
            k_wall, k_cpu, result = timed(lambda: neuron_merge(base, tau, weights, "elect_mean"), device, args.repeat)
            kernel = k_wall if device.type == "cuda" else k_cpu
            rows = min(args.ref_rows, out)
            r_wall, r_cpu, ref = timed(lambda: per_row_reference(base, tau, weights, rows), device, 1)
            b_wall, b_cpu, _ = timed(lambda: batched_svd_row_loop(base, tau, weights, rows), device, 1)
            per_row = (r_wall if device.type == "cuda" else r_cpu) * out / rows
            batched = (b_wall if device.type == "cuda" else b_cpu) * out / rows
            diff = float((result.orthogonal[:rows].double() - ref).abs().max() / ref.abs().max())
            print(f"| {out}×{width} | {tasks} | {k_wall:.2f} | {k_cpu:.2f} | {per_row:.1f} | {per_row / kernel:.0f}× | "
                  f"{batched:.1f} | {batched / kernel:.0f}× | {diff:.1e} |", flush=True)
            del base, tau, result
    print(f"(references timed on the first {args.ref_rows} rows and extrapolated linearly to all rows)")


if __name__ == "__main__":
    main()
