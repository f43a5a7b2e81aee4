"""Streaming engine: row blocks, in-place writes, read-ahead and the finite check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import neuro_reference
from helpers import needs_kernels, toy_family, write_model, write_recipe
from reference import reference_merge

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
    ("ties", {"density": 0.3, "mask_scope": "tensor"}),  # read whole in the merge read, merged in blocks
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


@pytest.mark.parametrize("method, params", [
    ("task_arithmetic", None),
    ("ties", {"mask_scope": "tensor"}),
    ("ties", {"mask_scope": "global"}),
    ("neuromerging", None),
])
def test_nonfinite_input_is_refused_with_its_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str,
                                                   params: dict | None) -> None:
    base, tasks = toy_family(tmp_path / "m", 2)
    bad = load_file(tasks[1] / "model.safetensors")
    bad["layer.1.weight"][3, 4] = float("inf")
    write_model(tasks[1], bad)
    recipe = write_recipe(tmp_path / "r.yaml", base, tasks, method, params)
    if (params or {}).get("mask_scope") == "global" or method == "neuromerging":  # refused in the first statistics read: no file made
        monkeypatch.setattr(engine, "ShardWriter", lambda *a, **k: pytest.fail("the merge read started"))
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


def cancelling_family(root: Path) -> tuple[Path, list[Path]]:
    """Three tasks on float32 tensors of exact eighths, where tasks 0 and 1 cancel exactly on many rows
    (so elections fall back to the tensor's majority sign), with row counts blocks cut unevenly."""
    g = torch.Generator().manual_seed(5)
    eighths = lambda *shape: torch.randint(-16, 17, shape, generator=g).float() / 8  # noqa: E731
    base = {"w": eighths(37, 16), "conv": eighths(9, 2, 3, 3), "bias": eighths(70), "scale": torch.tensor(0.5)}
    tasks = [{n: t + eighths(*t.shape) for n, t in base.items()} for _ in range(3)]
    for n in ("w", "conv"):
        d = tasks[0][n] - base[n]
        tasks[1][n] = base[n] - d  # τ_1 = −τ_0 exactly
        tasks[1][n][::3] = tasks[2][n][::3]  # a third of the rows elect normally
        tasks[2][n][1::3] = base[n][1::3]  # and a third are pure ties
    tasks[1]["bias"][:40] = 2 * base["bias"][:40] - tasks[0]["bias"][:40]
    folders = [write_model(root / "base", base)] + [write_model(root / f"t{i}", t) for i, t in enumerate(tasks)]
    return folders[0], folders[1:]


@pytest.mark.parametrize("method, params", [
    *[("ties", {"density": 0.6, "mask_scope": "tensor", "merge_fn": fn}) for fn in ("elect_mean", "elect_sum", "mean", "sum")],
    ("dare_linear", {"density": 0.5, "seed": 4}),
    ("dare_ties", {"density": 0.7, "seed": 2}),
    ("dare_ties", {"density": 0.7, "merge_fn": "elect_sum"}),
    ("neuromerging", {"density": 0.6, "mask_scope": "tensor", "lambda1": 0.7}),
    ("neuromerging", {"density": 0.6, "mask_scope": "global", "lambda1": 0.7, "lambda2": 1.3}),
    ("neuromerging", {"density": 1.0, "lambda1": 1.0, "merge_fn": "elect_sum"}),
])
def test_tensor_wide_elections_in_row_blocks_give_the_whole_tensor_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, params: dict) -> None:
    base, tasks = cancelling_family(tmp_path / "m")
    recipe = write_recipe(tmp_path / "r.yaml", base, tasks, method, params)
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 1 << 20)
    whole = merge(recipe, tmp_path / "whole")
    assert all(p.rows is None for p in pieces(prepare(load_recipe(recipe)).plan, ["w", "conv"], True))
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 50)  # 3 rows of w (37 = 12·3 + 1), 2 of conv, bias whole
    cut = pieces(prepare(load_recipe(recipe)).plan, ["w", "conv", "bias"], True)
    assert [p.rows for p in cut if p.name == "w"][-1] == (36, 37) and [p for p in cut if p.name == "bias"] == [Piece("bias")]
    blocks = merge(recipe, tmp_path / "blocks")
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == (tmp_path / "blocks" / "model.safetensors").read_bytes()
    for name, row in whole["tensors"].items():
        for key, value in row.items():
            if key not in ("task_l1", "task_l2", "delta_norm", "role", "shape"):
                assert blocks["tensors"][name][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (name, key)
    got = load_file(tmp_path / "blocks" / "model.safetensors")
    if method == "neuromerging":  # against the slow float64 SPEC references
        b, ts = load_file(base / "model.safetensors"), [load_file(t / "model.safetensors") for t in tasks]
        deltas, _, _ = neuro_reference.neuromerging(b, ts, params["density"], params.get("mask_scope", "global"),
                                                    params["lambda1"], params.get("lambda2", "auto"),
                                                    params.get("merge_fn", "elect_mean"))
        want = {n: b[n].double() + d for n, d in deltas.items()}
    else:
        want = reference_merge(base, tasks, method, params)
    for name, t in got.items():
        torch.testing.assert_close(t.double(), want[name].double(), rtol=1e-5, atol=1e-5, msg=name)


def test_the_cancellations_reach_the_majority_fallback(tmp_path: Path) -> None:
    """The family above is a real test of the fallback: a majority of 0 (no fallback) changes the result."""
    from neuromerge_cli.methods.elect import merge_values

    base, tasks = cancelling_family(tmp_path / "m")
    b, ts = load_file(base / "model.safetensors"), [load_file(t / "model.safetensors") for t in tasks]
    x = torch.stack([t["w"] - b["w"] for t in ts])
    w = torch.ones(3)
    assert not torch.equal(merge_values(x, w, "elect_mean"), merge_values(x, w, "elect_mean", majority=0.0))


@pytest.mark.parametrize("method, params", [
    ("ties", {"density": 0.6, "mask_scope": "tensor"}),
    ("ties", {"density": 0.6, "mask_scope": "tensor", "merge_fn": "elect_sum", "lambda": 0.7}),
    ("dare_ties", {"density": 0.7, "seed": 2, "lambda": 1.3}),
])
def test_blocks_elected_with_a_wrong_guess_are_mended(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       method: str, params: dict) -> None:
    """Whatever majority sign the blocks of a tensor guess, the output is the whole tensor's, byte for byte,
    with its delta norms; one of the two guesses is wrong, so mending is what is tested."""
    base, tasks = cancelling_family(tmp_path / "m")
    recipe = write_recipe(tmp_path / "r.yaml", base, tasks, method, params)
    whole = merge(recipe, tmp_path / "whole")
    expected = (tmp_path / "whole" / "model.safetensors").read_bytes()
    runs = merges_with_each_guess(recipe, tmp_path / "blocks", monkeypatch)
    for data, blocks in runs:
        assert data == expected
        for name, row in whole["tensors"].items():
            assert blocks["tensors"][name]["delta_norm"] == pytest.approx(row["delta_norm"], rel=1e-6, abs=1e-9)
    assert max(mended(report) for _, report in runs) > 0


def merges_with_each_guess(recipe: Path, out: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, dict]]:
    """Merges of ``recipe`` in blocks of rows whose elections all guess the majority sign +1, then all −1:
    (the output's bytes, the report) of each."""
    from neuromerge_cli.stats import TensorMajorityStat

    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 50)
    runs = []
    for guess in (1.0, -1.0):
        monkeypatch.setattr(TensorMajorityStat, "guess", lambda self, name, g=guess: g)
        report = merge(recipe, out / str(guess))
        runs.append(((out / str(guess) / "model.safetensors").read_bytes(), report))
    return runs


def mended(report: dict) -> int:
    return report["global"]["tensor_majority"]["blocks_mended"]


def test_a_sweep_mends_every_variant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from neuromerge_cli.engine import Variant, merge_variants
    from neuromerge_cli.stats import TensorMajorityStat

    base, tasks = cancelling_family(tmp_path / "m")
    recipe = write_recipe(tmp_path / "r.yaml", base, tasks, "ties", {"density": 0.6, "mask_scope": "tensor"})
    lambdas = (0.5, 1.0, 1.7)
    wanted = {}
    for lam in lambdas:
        single = write_recipe(tmp_path / f"r{lam}.yaml", base, tasks, "ties",
                              {"density": 0.6, "mask_scope": "tensor", "lambda": lam})
        merge(single, tmp_path / f"whole{lam}")
        wanted[lam] = (tmp_path / f"whole{lam}" / "model.safetensors").read_bytes()
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 50)
    mended_blocks = []
    for guess in (1.0, -1.0):
        monkeypatch.setattr(TensorMajorityStat, "guess", lambda self, name, g=guess: g)
        reports = merge_variants(prepare(load_recipe(recipe)), MergeOptions(tmp_path / "unused"),
                                 [Variant(tmp_path / f"sweep{guess}-{lam}", {"lambda": lam}) for lam in lambdas])
        mended_blocks.append(mended(reports[0]))
        for lam in lambdas:
            assert (tmp_path / f"sweep{guess}-{lam}" / "model.safetensors").read_bytes() == wanted[lam], (guess, lam)
    assert max(mended_blocks) > 0


def test_mended_blocks_reach_every_copy_of_a_tied_weight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, tasks = cancelling_family(tmp_path / "m")

    def tied(folder: Path, out: Path) -> Path:
        tensors = load_file(folder / "model.safetensors")
        return write_model(out, {**tensors, "lm_head.weight": tensors["w"].clone(),
                                 "model.embed_tokens.weight": tensors["w"].clone()})

    base = tied(base, tmp_path / "tb")
    tasks = [tied(t, tmp_path / f"tt{i}") for i, t in enumerate(tasks)]
    recipe = write_recipe(tmp_path / "r.yaml", base, tasks, "ties", {"density": 0.6, "mask_scope": "tensor"})
    whole = merge(recipe, tmp_path / "whole")
    assert len(whole["totals"]["tied"]) == 1
    expected = (tmp_path / "whole" / "model.safetensors").read_bytes()
    runs = merges_with_each_guess(recipe, tmp_path / "blocks", monkeypatch)
    assert all(data == expected for data, _ in runs)
    assert max(mended(report) for _, report in runs) > 0


@pytest.mark.parametrize("params, weights, out_dtype", [
    ({}, None, None),
    ({"density": 0.4, "mask_scope": "tensor", "lambda1": 0.7}, [0.5, 1.25, 1.0], None),
    ({"density": 0.5, "lambda1": 1.0, "lambda2": 1.3, "merge_fn": "elect_sum"}, None, "float32"),
    ({"density": 1.0, "merge_fn": "mean", "lambda_point": 0.5}, [0.5, 1.25, 1.0], None),
    ({"density": 0.3, "mask_scope": "tensor", "merge_fn": "sum", "lambda1": 0.2}, None, None),
])
@pytest.mark.parametrize("family", ["toy", "cancelling"])
@needs_kernels
def test_fused_neuromerging_gives_the_bytes_of_the_torch_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             params: dict, weights: list | None,
                                                             out_dtype: str | None, family: str) -> None:
    """NeuroMerging's fused neuron kernels (in blocks of rows, whose parallel elections may need their tensor's
    majority sign) write what the torch path writes: the float64 sums are added in another order, which on
    these inputs changes no float32 value; the report's figures agree to rounding."""
    from helpers import merge as merge_dict, recipe_dict

    from neuromerge_cli import kernels

    root = tmp_path / "m"
    base, tasks = toy_family(root, 3, torch.bfloat16) if family == "toy" else cancelling_family(root)
    extra = {"dtype": out_dtype} if out_dtype else {}
    recipe = recipe_dict(base, tasks, "neuromerging", params, weights and weights[:len(tasks)], **extra)
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 16)
    calls: list[int] = []
    gram = kernels.neuron_gram
    monkeypatch.setattr(kernels, "neuron_gram", lambda *a, **k: calls.append(1) or gram(*a, **k))
    fused = merge_dict(recipe, tmp_path / "fused")
    assert len(calls) > 10  # the blocks of every neuron tensor
    monkeypatch.setattr(kernels, "ENABLED", False)
    plain = merge_dict(recipe, tmp_path / "plain")
    for f in (tmp_path / "plain").glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "fused" / f.name).read_bytes()
    assert fused["global"]["sigma"] == pytest.approx(plain["global"]["sigma"], rel=1e-12)
    assert fused["global"]["lambda2"] == pytest.approx(plain["global"]["lambda2"], rel=1e-12)
    assert fused["global"].get("tensor_majority") == plain["global"].get("tensor_majority")  # blocks read again
    for name, row in plain["tensors"].items():
        got = fused["tensors"][name]
        assert set(got) == set(row)
        for key, value in row.items():
            if isinstance(value, float) or (isinstance(value, list) and value and isinstance(value[0], float)):
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-9), (name, key)
            else:
                assert got[key] == value, (name, key)


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_neuromerging_merges_tensors_without_rows_or_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            scope: str) -> None:
    from helpers import merge as merge_dict, recipe_dict

    from neuromerge_cli import kernels

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 5, generator=g), "no_columns": torch.zeros(4, 0), "no_rows": torch.zeros(0, 3),
            "b": torch.randn(5, generator=g)}
    base = {k: v.bfloat16() for k, v in base.items()}
    tasks = [{k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in base.items()}
             for _ in range(2)]
    folders = [write_model(tmp_path / "base", base)] + [write_model(tmp_path / f"t{i}", t) for i, t in enumerate(tasks)]
    recipe = recipe_dict(folders[0], folders[1:], "neuromerging", {"mask_scope": scope}, None)
    merge_dict(recipe, tmp_path / "fused")
    monkeypatch.setattr(kernels, "ENABLED", False)
    merge_dict(recipe, tmp_path / "plain")
    fused, plain = read_all(tmp_path / "fused"), read_all(tmp_path / "plain")
    assert fused["no_columns"].shape == (4, 0) and fused["no_rows"].shape == (0, 3)
    for name, w in plain.items():
        assert torch.equal(fused[name], w)


@pytest.mark.parametrize("method, params, weights, out_dtype", [
    ("task_arithmetic", {"lambda": 0.7}, [0.5, 1.25, 1.0], None),
    ("task_arithmetic", {}, None, "float32"),
    ("linear", {}, [0.2, 0.3, 1.5], None),
    ("ties", {"density": 0.3, "mask_scope": "tensor"}, None, None),
    ("ties", {"density": 0.5, "mask_scope": "tensor", "lambda": 1.3}, [0.5, 1.25, 1.0], None),
    ("ties", {"density": 0.3, "mask_scope": "global"}, None, None),
    ("ties", {"density": 1.0, "mask_scope": "tensor", "merge_fn": "elect_sum"}, None, "float32"),
    ("ties", {"density": 0.4, "mask_scope": "tensor", "merge_fn": "mean"}, [0.5, 1.25, 1.0], None),
    ("dare_ties", {"density": 0.6, "seed": 3}, None, None),
    ("dare_ties", {"density": 0.5, "merge_fn": "elect_sum", "lambda": 0.8}, [0.5, 1.25, 1.0], "float32"),
    ("dare_linear", {"density": 0.4}, [0.5, 1.25, 1.0], None),
])
@pytest.mark.parametrize("family", ["toy", "cancelling"])
@needs_kernels
def test_fused_merges_give_the_bytes_of_the_torch_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       method: str, params: dict, weights: list | None,
                                                       out_dtype: str | None, family: str) -> None:
    from helpers import merge as merge_dict, recipe_dict

    from neuromerge_cli import kernels

    root = tmp_path / "m"
    base, tasks = toy_family(root, 3, torch.bfloat16) if family == "toy" else cancelling_family(root)
    extra = {"dtype": out_dtype} if out_dtype else {}
    recipe = recipe_dict(base, tasks, method, params, weights and weights[:len(tasks)], **extra)
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 16)
    calls: list[int] = []
    fused_kernel = kernels.merge
    monkeypatch.setattr(kernels, "merge", lambda *a, **k: calls.append(1) or fused_kernel(*a, **k))
    fused = merge_dict(recipe, tmp_path / "fused")
    made = len(calls)
    assert made > 10  # the blocks of every float tensor
    monkeypatch.setattr(kernels, "ENABLED", False)
    plain = merge_dict(recipe, tmp_path / "plain")
    assert len(calls) == made
    for f in (tmp_path / "plain").glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "fused" / f.name).read_bytes()
    assert fused["global"] == plain["global"]
    per_tensor = params.get("mask_scope", "tensor") == "tensor" and params.get("merge_fn", "elect")[:5] == "elect"
    if family == "cancelling" and method in ("ties", "dare_ties") and per_tensor and weights is None:
        assert mended(fused) > 0  # blocks elected with a wrong guess, mended in the files
    for name, row in plain["tensors"].items():
        got = fused["tensors"][name]
        assert got["task_l1"] == pytest.approx(row["task_l1"], rel=1e-5)
        assert got["delta_norm"] == pytest.approx(row["delta_norm"], rel=1e-5, abs=1e-9)
        assert got.get("sign_conflict") == row.get("sign_conflict")
