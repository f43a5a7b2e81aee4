"""dare_linear / dare_ties: seeded drop-and-rescale, against the SPEC reference and statistically."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import reference
from helpers import load_output, merge, recipe_dict, toy_family, write_model
from neuromerge_cli.methods import common
from neuromerge_cli.methods.common import dare_drop
from reference import load_folder, reference_merge


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return toy_family(tmp_path_factory.mktemp("dare"), 3)


@pytest.mark.parametrize("method, params, weights", [
    ("dare_linear", {"density": 0.5, "lambda": 0.8, "seed": 3}, [1.0, -0.5, 2.0]),
    ("dare_ties", {"density": 0.4, "seed": 11, "merge_fn": "elect_mean"}, [1.0, 0.5, 2.0]),
    ("dare_ties", {"density": 0.7, "merge_fn": "sum"}, None),
])
def test_matches_the_reference(family: tuple[Path, list[Path]], tmp_path: Path, method: str, params: dict,
                               weights: list[float] | None) -> None:
    base, tasks = family
    merge(recipe_dict(base, tasks, method, params, weights), tmp_path / "out")
    out, ref = load_output(tmp_path / "out"), reference_merge(base, tasks, method, params, weights)
    for name, t in out.items():
        torch.testing.assert_close(t.double(), ref[name].double(), rtol=0, atol=2e-6, msg=name)


def test_same_seed_same_bytes_different_seed_different(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, tasks = family
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        merge(recipe_dict(base, tasks, "dare_ties", {"density": 0.5, "seed": seed}), tmp_path / name)
    data = {n: (tmp_path / n / "model.safetensors").read_bytes() for n in "abc"}
    assert data["a"] == data["b"]
    assert data["a"] != data["c"]


def test_keep_probability_and_unbiased_rescale() -> None:
    n, keep = 200_000, 0.3
    tau = torch.full((1, n), 0.5)
    dropped = dare_drop(tau, keep, seed=0, name="w")
    kept = dropped[0] != 0
    sigma = math.sqrt(keep * (1 - keep) / n)
    assert abs(float(kept.float().mean()) - keep) < 5 * sigma
    assert torch.allclose(dropped[0][kept], torch.tensor(0.5 / keep))
    # E[DARE(τ)] = τ: the mean of the kept-and-rescaled values over many entries is ≈ τ
    mean = float(dropped.mean())
    assert abs(mean - 0.5) < 5 * 0.5 * math.sqrt((1 - keep) / keep / n)
    # tasks get independent masks; tensors of other names too
    two = dare_drop(torch.ones(2, n), keep, seed=0, name="w")
    assert not torch.equal(two[0] != 0, two[1] != 0)
    assert not torch.equal(dare_drop(tau, keep, 0, "v") != 0, kept[None])
    assert torch.equal(dare_drop(tau, 1.0, 0, "w"), tau)


def test_one_model_density_one_gives_that_model_and_lambda_zero_the_base(tmp_path: Path) -> None:
    base, tasks = toy_family(tmp_path, 1)
    theta0, task = load_folder(base), load_folder(tasks[0])
    for method in ("dare_linear", "dare_ties"):
        merge(recipe_dict(base, tasks, method, {"density": 1.0}), tmp_path / method)
        assert all(torch.equal(t, task[n]) for n, t in load_output(tmp_path / method).items()), method
        merge(recipe_dict(base, tasks, method, {"density": 0.3, "lambda": 0.0}), tmp_path / f"{method}0")
        assert all(torch.equal(t, theta0[n]) for n, t in load_output(tmp_path / f"{method}0").items()), method


def test_one_task_keeps_entries_at_tau_over_p_and_resets_the_rest(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(100, 100, generator=g)}
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "task", {"w": base["w"] + 0.1 * torch.randn(100, 100, generator=g)})
    keep = 0.25
    merge(recipe_dict(tmp_path / "base", [tmp_path / "task"], "dare_linear", {"density": keep}), tmp_path / "out")
    theta = load_output(tmp_path / "out")["w"]
    tau = load_folder(tmp_path / "task")["w"] - base["w"]
    changed = theta != base["w"]
    assert abs(float(changed.float().mean()) - keep) < 5 * math.sqrt(keep * (1 - keep) / 10_000)
    torch.testing.assert_close(theta[changed] - base["w"][changed], tau[changed] / keep, rtol=1e-5, atol=1e-6)


def test_draws_follow_the_documented_chunks_whatever_the_row_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of DARE_CHUNK entries, each from its own generator (reference.dare_keep_mask, written apart):
    a block of rows draws only the chunks it overlaps and gets the same bits as the whole tensor."""
    monkeypatch.setattr(common, "DARE_CHUNK", 64)
    monkeypatch.setattr(reference, "DARE_CHUNK", 64)
    tau = torch.randn(2, 37, 9, generator=torch.Generator().manual_seed(0))
    keep, seed = 0.4, 7
    want = torch.stack([torch.where(reference.dare_keep_mask(tau.shape[1:], keep, seed, "w", t), tau[t] / keep, 0.0)
                        for t in range(2)])
    assert torch.equal(dare_drop(tau, keep, seed, "w"), want)
    for step in (1, 5, 8, 36):
        blocks = [dare_drop(tau[:, r:r + step], keep, seed, "w", r, 37) for r in range(0, 37, step)]
        assert torch.equal(torch.cat(blocks, dim=1), want), step
    assert not torch.equal(dare_drop(tau, keep, seed + 1, "w"), want)


def test_a_tensors_majority_read_between_its_blocks_draws_no_chunk_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    # the merge pass draws block 0, a tie there reads every block for the tensor's majority sign, then
    # blocks 1.. are merged: each (task, chunk) is drawn once, also with another tensor's chunks between
    monkeypatch.setattr(common, "DARE_CHUNK", 64)
    monkeypatch.setattr(common, "_DRAWN", type(common._DRAWN)())
    drawn: list[int] = []
    real = common.chunk_keep
    monkeypatch.setattr(common, "chunk_keep", lambda seed, n, bound: drawn.append(seed) or real(seed, n, bound))
    tau = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(1))  # 4 chunks of 64 per task
    dare_drop(torch.randn(3, 4, 16), 0.5, 2, "other")  # one chunk per task of another tensor first
    blocks = [dare_drop(tau[:, r:r + 4], 0.5, 2, "w", r, 16) for r in (0, 4, 8, 12)]  # the majority's read
    merged = [dare_drop(tau[:, r:r + 4], 0.5, 2, "w", r, 16) for r in (4, 8, 12)]
    assert len(drawn) == 3 + 12 and len(set(drawn)) == 15
    assert all(torch.equal(a, b) for a, b in zip(blocks[1:], merged))
    monkeypatch.setattr(common, "DRAWN_CHUNKS_KEPT", 2)  # a bounded cache: the least recently used go
    dare_drop(tau[:, 12:], 0.5, 2, "w", 12, 16)  # hits, and now the most recent
    dare_drop(tau[:, :4], 0.5, 2, "x", 0, 16)  # three new chunks: only the last two stay
    assert len(drawn) == 18 and len(common._DRAWN) == 2
    dare_drop(tau[:, 12:], 0.5, 2, "w", 12, 16)
    assert len(drawn) == 21
