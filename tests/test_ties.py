"""ties through the engine against the slow SPEC reference (tests/reference.py) and properties."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import dyadic_family, load_output, merge, recipe_dict, toy_family, write_model
from neuromerge_cli import engine
from reference import load_folder, reference_merge

WEIGHTS = (1.0, 0.5, 2.0)


@pytest.fixture(scope="module")
def dyadic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return dyadic_family(tmp_path_factory.mktemp("dyadic"), WEIGHTS)


def assert_matches(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert set(out) == set(ref)
    for name, t in out.items():
        assert t.dtype == ref[name].dtype or ref[name].dtype == torch.float64, name
        torch.testing.assert_close(t.double(), ref[name].double(), rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("merge_fn", ["elect_mean", "elect_sum", "mean", "sum"])
def test_ties_matches_the_reference(dyadic: tuple[Path, list[Path]], tmp_path: Path, scope: str, merge_fn: str) -> None:
    base, tasks = dyadic
    params = {"density": 0.3, "lambda": 0.75, "mask_scope": scope, "merge_fn": merge_fn}
    report = merge(recipe_dict(base, tasks, "ties", params, list(WEIGHTS)), tmp_path / "out")
    ref = reference_merge(base, tasks, "ties", params, list(WEIGHTS))
    assert_matches(load_output(tmp_path / "out"), ref)
    if scope == "global":
        assert report["totals"]["merged_parameters"] == report["global"]["trim"]["entries_per_task"]


def test_majority_fallback_matters_and_differs_between_scopes(dyadic: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """On the cancelling coordinates the global scope falls back to +, layer.1 on its own to −."""
    base, tasks = dyadic
    params = {"density": 1.0, "merge_fn": "elect_sum"}
    merge(recipe_dict(base, tasks, "ties", params, list(WEIGHTS)), tmp_path / "g")
    merge(recipe_dict(base, tasks, "ties", {**params, "mask_scope": "tensor"}, list(WEIGHTS)), tmp_path / "t")
    theta0 = load_folder(base)["layer.1.weight"]
    t0 = load_folder(tasks[0])["layer.1.weight"] - theta0
    t1 = load_folder(tasks[1])["layer.1.weight"] - theta0
    t2 = load_folder(tasks[2])["layer.1.weight"] - theta0
    cancel = (t0 != 0) & (t1 * WEIGHTS[1] == -t0 * WEIGHTS[0]) & (t2 == 0)
    assert int(cancel.sum()) > 5
    delta_g = load_output(tmp_path / "g")["layer.1.weight"] - theta0
    delta_t = load_output(tmp_path / "t")["layer.1.weight"] - theta0
    # elect_sum of the one agreeing weighted value: + fallback keeps the positive one, − the negative one
    positive = torch.where(t0 > 0, t0 * WEIGHTS[0], -t0 * WEIGHTS[0])
    assert torch.equal(delta_g[cancel], positive[cancel])
    assert torch.equal(delta_t[cancel], -positive[cancel])


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_task_order_invariance(dyadic: tuple[Path, list[Path]], tmp_path: Path, scope: str) -> None:
    base, tasks = dyadic
    params = {"density": 0.4, "mask_scope": scope}
    merge(recipe_dict(base, tasks, "ties", params, list(WEIGHTS)), tmp_path / "a")
    order = [2, 0, 1]
    merge(recipe_dict(base, [tasks[i] for i in order], "ties", params, [WEIGHTS[i] for i in order]), tmp_path / "b")
    a, b = load_output(tmp_path / "a"), load_output(tmp_path / "b")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_gaussian_bf16_sharded_model_matches_the_reference(tmp_path: Path) -> None:
    base, tasks = toy_family(tmp_path, 3, dtype=torch.bfloat16, shards=2)
    params = {"density": 0.2}
    merge(recipe_dict(base, tasks, "ties", params), tmp_path / "out")
    out = load_output(tmp_path / "out")
    ref = reference_merge(base, tasks, "ties", params)
    for name, t in out.items():
        assert t.dtype == load_folder(base)[name].dtype
        expected = ref[name].to(t.dtype) if t.is_floating_point() else ref[name]
        # float32 math rounded once to bfloat16: equal up to one bfloat16 rounding step
        torch.testing.assert_close(t.float(), expected.float(), rtol=2**-7, atol=1e-6, msg=name)


def test_lambda_zero_gives_the_base_and_one_dense_task_gives_that_task(tmp_path: Path) -> None:
    base, tasks = toy_family(tmp_path, 2)
    merge(recipe_dict(base, tasks, "ties", {"lambda": 0.0}), tmp_path / "zero")
    theta0 = load_folder(base)
    assert all(torch.equal(t, theta0[n]) for n, t in load_output(tmp_path / "zero").items())
    for fn in ("elect_mean", "elect_sum", "mean", "sum"):
        merge(recipe_dict(base, tasks[:1], "ties", {"density": 1.0, "merge_fn": fn}), tmp_path / fn)
        task = load_folder(tasks[0])
        assert all(torch.equal(t, task[n]) for n, t in load_output(tmp_path / fn).items()), fn


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_scalar_and_empty_tensors(tmp_path: Path, scope: str) -> None:
    g = torch.Generator().manual_seed(0)
    base = {"scalar": torch.tensor(1.5), "empty": torch.zeros(0, 4), "w": torch.randn(5, 3, generator=g),
            "b": torch.randn(3, generator=g)}
    write_model(tmp_path / "base", base)
    tasks = [write_model(tmp_path / f"t{i}", {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()})
             for i in range(2)]
    params = {"mask_scope": scope, "density": 0.4}
    merge(recipe_dict(tmp_path / "base", tasks, "ties", params), tmp_path / "out")
    out = load_output(tmp_path / "out")
    assert out["empty"].shape == (0, 4) and out["scalar"].shape == ()
    assert_matches(out, reference_merge(tmp_path / "base", tasks, "ties", params))


def test_a_global_majority_found_in_the_merge_read_mends_the_blocks_that_guessed_wrong(
        dyadic: tuple[Path, list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dyadic family's task vectors negated: the model leans negative, and the first block elects its
    cancelling coordinates with the guess + (nothing is known before it), the others with the sign of the
    blocks before them; once the merge read is over the first is mended in the file."""
    base, tasks = dyadic
    theta0 = load_folder(base)
    negated = [write_model(tmp_path / f"neg{i}", {n: (2 * theta0[n] - t if t.is_floating_point() else t)
                                                   for n, t in load_folder(task).items()})
               for i, task in enumerate(tasks)]
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 24)  # blocks of rows: many guesses
    params = {"density": 1.0, "merge_fn": "elect_sum"}
    report = merge(recipe_dict(base, negated, "ties", params, list(WEIGHTS)), tmp_path / "out")
    assert report["global"]["majority"] == {"majority_sign": -1.0, "blocks_mended": 1}  # the first, guessing +
    assert report["timings"]["statistics_reads"] == 0
    assert_matches(load_output(tmp_path / "out"), reference_merge(base, negated, "ties", params, list(WEIGHTS)))
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")) == []
