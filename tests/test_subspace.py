"""The subspace ablation: θ0 + the orthogonal or the parallel neuronal parts of one fine-tuned model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import neuro_reference as ref
from helpers import toy_family, write_recipe
from method_harness import family, merge_in_memory
from neuromerge_cli.cli import app
from neuromerge_cli.methods.subspaces import split_parts


def test_parts_add_up_to_the_task_vector_and_match_the_reference() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(9, 7, generator=g)
    base[2] = 0.0
    tau = torch.randn(2, 9, 7, generator=g)
    tau[1, 4] = 3.0 * base[4]
    parallel, orthogonal = split_parts(base, tau, budget=2 * 7 * 2)
    assert torch.allclose(parallel + orthogonal, tau, atol=1e-6)
    assert float((orthogonal * base).sum(-1).abs().max()) < 1e-5  # p_t ⟂ w0
    assert torch.equal(parallel[:, 2], torch.zeros(2, 7)) and torch.allclose(orthogonal[:, 2], tau[:, 2])
    assert float(orthogonal[1, 4].abs().max()) < 1e-6
    for t in range(2):
        for k in range(9):
            a, p = ref.decompose_row(base[k].double(), tau[t, k : k + 1].double())
            assert torch.allclose(orthogonal[t, k].double(), p[0], atol=1e-6)
            assert torch.allclose(parallel[t, k].double(), a[0] * base[k].double(), atol=1e-6)


@pytest.mark.parametrize("points", ["task", "base"])
def test_orthogonal_plus_parallel_is_the_fine_tuned_model(points: str) -> None:
    base, tasks = family(1, seed=1)
    orth, _, stats = merge_in_memory("subspace", {"keep": "orthogonal", "points": points}, base, tasks)
    par, _, _ = merge_in_memory("subspace", {"keep": "parallel", "points": points}, base, tasks)
    for n in ("lin.weight", "conv.weight"):
        assert torch.allclose(orth[n] + par[n], tasks[0][n] - base[n], atol=1e-6)
        share = stats[n]["parallel_share"][0] + stats[n]["orthogonal_share"][0]
        assert share == pytest.approx(1.0)
    want_bias = tasks[0]["lin.bias"] - base["lin.bias"] if points == "task" else torch.zeros(12)
    assert torch.equal(orth["lin.bias"], want_bias) and torch.equal(par["lin.bias"], want_bias)


def test_weight_scales_the_kept_part() -> None:
    base, tasks = family(1, seed=2)
    one, _, _ = merge_in_memory("subspace", {}, base, tasks)
    half, _, _ = merge_in_memory("subspace", {}, base, tasks, weights=[0.5])
    assert all(torch.allclose(half[n], 0.5 * one[n]) for n in one)


def test_cli_keeps_one_subspace_and_needs_exactly_one_model(tmp_path: Path) -> None:
    base_dir, task_dirs = toy_family(tmp_path, num_tasks=2)
    outs = {}
    for keep in ("orthogonal", "parallel"):
        recipe = write_recipe(tmp_path / f"{keep}.yaml", base_dir, task_dirs[:1], "subspace", {"keep": keep},
                              output=tmp_path / keep)
        proc = CliRunner().invoke(app, ["run", str(recipe), "-q"])
        assert proc.exit_code == 0, proc.output
        outs[keep] = load_file(str(tmp_path / keep / "model.safetensors"))
    base = load_file(str(base_dir / "model.safetensors"))
    task = load_file(str(task_dirs[0] / "model.safetensors"))
    for n in ("layer.0.weight", "embed.weight", "conv.weight"):
        summed = outs["orthogonal"][n] + outs["parallel"][n] - base[n]
        assert torch.allclose(summed, task[n], atol=1e-5)
        rows = (outs["orthogonal"][n] - base[n]).reshape(base[n].shape[0], -1)
        assert float((rows * base[n].reshape(rows.shape)).sum(1).abs().max()) < 1e-4
    bad = write_recipe(tmp_path / "bad.yaml", base_dir, task_dirs, "subspace", output=tmp_path / "bad")
    proc = CliRunner().invoke(app, ["run", str(bad)])
    assert proc.exit_code == 1
    assert "subspace" in proc.output and "Traceback" not in proc.output
    assert not (tmp_path / "bad").exists()
