"""Streaming engine: row blocks, in-place writes, read-ahead and the finite check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import toy_family, write_model, write_recipe

from neuromerge_cli import engine
from neuromerge_cli.checkpoints import Source, open_checkpoint
from neuromerge_cli.engine import MergeOptions, Piece, pieces, prepare, run_merge
from neuromerge_cli.errors import MergeError
from neuromerge_cli.recipe import load_recipe


def merge(recipe: Path, out: Path, device: str = "cpu") -> dict:
    return run_merge(prepare(load_recipe(recipe)), MergeOptions(out, device=device))


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_pieces_cover_every_row_once(tmp_path: Path) -> None:
    base, tasks = toy_family(tmp_path, 1)
    plan = prepare(load_recipe(write_recipe(tmp_path / "r.yaml", base, tasks, "task_arithmetic"))).plan
    names = [t.name for t in plan.merged]
    work = pieces(plan, names, rowwise=True, block=20)
    by_name = plan.by_name()
    for name in names:
        rows = [p.rows for p in work if p.name == name]
        shape = by_name[name].shape
        if rows == [None]:
            assert torch.Size(shape).numel() <= 20 or len(shape) == 0 or shape[0] < 2
            continue
        assert rows[0][0] == 0 and rows[-1][1] == shape[0]
        assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    assert pieces(plan, names, rowwise=False, block=20) == [Piece(n) for n in names]


def test_read_rows_is_the_slice_of_the_full_read(tmp_path: Path) -> None:
    t = torch.randn(7, 5).bfloat16()
    folder = write_model(tmp_path / "m", {"w": t})
    ck = open_checkpoint(Source("m", folder))
    assert torch.equal(ck.read("w", (2, 6)), t[2:6])
    assert torch.equal(ck.read("w"), t)


@pytest.mark.parametrize("method, params", [
    ("task_arithmetic", {"lambda": 0.7}),
    ("ties", {"density": 0.3}),
    ("ties", {"density": 1.0, "merge_fn": "mean"}),
])
def test_row_blocks_give_the_whole_tensor_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                method: str, params: dict) -> None:
    base, tasks = toy_family(tmp_path / "m", 3, torch.bfloat16, shards=2)
    recipe = write_recipe(tmp_path / "r.yaml", base, tasks, method, params)
    whole = merge(recipe, tmp_path / "whole")
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 16)
    monkeypatch.setattr(engine, "PREFETCH_BYTES", 64)
    blocks = merge(recipe, tmp_path / "blocks")
    for f in (tmp_path / "whole").glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "blocks" / f.name).read_bytes()
    for name, row in whole["tensors"].items():
        assert blocks["tensors"][name]["task_l2"] == pytest.approx(row["task_l2"], rel=1e-5)
        assert blocks["tensors"][name]["delta_norm"] == pytest.approx(row["delta_norm"], rel=1e-5, abs=1e-9)
        if "sign_conflict" in row:
            assert blocks["tensors"][name]["sign_conflict"] == pytest.approx(row["sign_conflict"], abs=1e-6)


def test_task_arithmetic_matches_the_formula_in_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, tasks = toy_family(tmp_path / "m", 2)
    recipe = write_recipe(tmp_path / "r.yaml", base, tasks, "task_arithmetic", {"lambda": 0.5})
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 16)
    merge(recipe, tmp_path / "out")
    got = read_all(tmp_path / "out")
    b = load_file(base / "model.safetensors")
    ts = [load_file(t / "model.safetensors") for t in tasks]
    for name, w in b.items():
        if not w.is_floating_point():
            assert torch.equal(got[name], w)
            continue
        want = w + 0.5 * sum(t[name] - w for t in ts)
        torch.testing.assert_close(got[name], want, rtol=1e-6, atol=1e-6)


def test_nonfinite_input_is_refused_with_its_model(tmp_path: Path) -> None:
    base, tasks = toy_family(tmp_path / "m", 2)
    bad = load_file(tasks[1] / "model.safetensors")
    bad["layer.1.weight"][3, 4] = float("inf")
    write_model(tasks[1], bad)
    recipe = write_recipe(tmp_path / "r.yaml", base, tasks, "task_arithmetic")
    with pytest.raises(MergeError, match=r"task1.*layer\.1\.weight.*NaN or Inf"):
        merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_cuda_matches_cpu(tmp_path: Path, method: str) -> None:
    base, tasks = toy_family(tmp_path / "m", 3, torch.bfloat16)
    recipe = write_recipe(tmp_path / "r.yaml", base, tasks, method)
    merge(recipe, tmp_path / "cpu", "cpu")
    report = merge(recipe, tmp_path / "cuda", "cuda")
    assert report["peak_memory"]["cuda_bytes"] > 0
    cpu, cuda = read_all(tmp_path / "cpu"), read_all(tmp_path / "cuda")
    for name, w in cpu.items():
        torch.testing.assert_close(cuda[name].float(), w.float(), rtol=1e-2, atol=1e-3)
