"""Two CPU processes on gloo over loopback (torchrun) write the same bytes as one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import fine_tune, toy_family, toy_tensors, write_model, write_recipe

from neuromerge_cli.distributed import World


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("method, params", [
    ("ties", {"density": 0.3}),  # global trim + majority sign: histograms and sums all-reduced
    ("ties", {"density": 0.2, "lambda": 0.9}),  # aimed by a sample: one read; ties mended after the sums all-reduced
    ("ties", {"density": 0.3, "mask_scope": "tensor", "lambda": 0.8}),
    ("dare_ties", {"density": 0.5, "seed": 3}),  # per-tensor majority signs; DARE draws by chunks of entries
    ("neuromerging", {"density": 0.3}),  # a global trim in one read, aimed by a sample of every row
    ("pcb", {"ratio": 0.2}),  # order statistics aimed by a sample; the score's max all-reduced as a maximum
])
def test_two_processes_write_the_single_process_bytes(tmp_path: Path, method: str, params: dict) -> None:
    base, tasks = toy_family(tmp_path / "models", 3, torch.bfloat16, shards=2)
    if method in ("neuromerging", "pcb") or params.get("lambda") == 0.9:  # many rows: a sample aims the window well
        base, tasks = family_with_rows(tmp_path / "models", 1024)
    recipe = write_recipe(tmp_path / "r.yaml", base, tasks, method, params)
    # small row blocks, so that large tensors are split into blocks as well as across ranks
    env = {**os.environ, "NEUROMERGE_BLOCK_ELEMENTS": "24", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "NEUROMERGE_SAMPLE_SHARE": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli([sys.executable, "-m", "neuromerge_cli", "run", str(recipe), "-o", str(one), "-q", "--device", "cpu"], env)
    run_cli([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
             "--master_addr=127.0.0.1", f"--master_port={free_port()}",
             "-m", "neuromerge_cli", "run", str(recipe), "-o", str(two), "-q", "--device", "cpu"], env)
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    for f in one.glob("*.safetensors"):
        assert f.read_bytes() == (two / f.name).read_bytes(), f.name
    assert (one / "model.safetensors.index.json").read_text() == (two / "model.safetensors.index.json").read_text()
    r1, r2 = (json.loads((d / "merge_report.json").read_text()) for d in (one, two))
    t1, t2 = r1["global"].get("trim", {"sigma": []}), r2["global"].get("trim", {"sigma": []})
    assert {k: v for k, v in t1.items() if k != "sigma"} == {k: v for k, v in t2.items() if k != "sigma"}
    assert t1["sigma"] == pytest.approx(t2["sigma"], rel=1e-12)  # float64 sums added in another order
    # the same majority sign; the blocks mended depend on what each process had merged when it guessed
    signs = [r["global"].get("majority", {}).get("majority_sign") for r in (r1, r2)]
    assert signs[0] == signs[1]
    assert r1["tensors"].keys() == r2["tensors"].keys()
    for name, row in r1["tensors"].items():
        assert row["task_l1"] == pytest.approx(r2["tensors"][name]["task_l1"], rel=1e-6)
    assert r2["peak_memory"]["processes"] == 2
    if method == "neuromerging" or params.get("lambda") == 0.9:  # the window's counts summed across processes
        assert r1["timings"]["statistics_reads"] == r2["timings"]["statistics_reads"] == 1  # held every threshold
    if method == "pcb":  # the same order statistics and max; at most one read more where a window missed
        assert r1["global"] == r2["global"] and r1["timings"]["statistics_reads"] in (2, 3, 4)
        assert r1["timings"]["statistics_reads"] == r2["timings"]["statistics_reads"]
    if params.get("lambda") == 0.9:  # the sign no process guesses before its first block (test_ties mends one)
        assert r1["global"]["majority"]["majority_sign"] == -1.0
    assert not list(tmp_path.glob(".two*")), "temporary folder left behind"


def family_with_rows(root: Path, rows: int) -> tuple[Path, list[Path]]:
    """The toy family in bfloat16 with a (rows, 16) matrix more, in two shards; the task vectors lean
    negative (a majority sign of −1: the first blocks, guessing +1, are mended)."""
    weights = {**toy_tensors(0, torch.bfloat16),
               "big.weight": torch.randn(rows, 16, generator=torch.Generator().manual_seed(2)).bfloat16()}
    base = write_model(root / "wide" / "base", weights, shards=2)
    lean = {n: t.float() - 0.01 if t.is_floating_point() else t for n, t in weights.items()}
    return base, [write_model(root / "wide" / f"task{t}", {n: x.to(weights[n].dtype) for n, x in
                                                            fine_tune(lean, t).items()}, shards=2) for t in range(3)]


def test_share_splits_items_into_contiguous_disjoint_runs() -> None:
    items = list(range(11))
    cost = [5, 1, 1, 9, 2, 2, 2, 7, 1, 1, 3]
    shares = [World(rank=r, size=3).share(items, cost) for r in range(3)]
    assert sum(shares, []) == items  # disjoint, complete, in order
    totals = [sum(cost[i] for i in s) for s in shares]
    assert max(totals) - min(totals) <= max(cost)
    assert World().share(items, cost) == items
