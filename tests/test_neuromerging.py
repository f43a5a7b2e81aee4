"""NeuroMerging against a slow per-row SVD reference written from the SPEC (tests/neuro_reference.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import neuro_reference as ref
from helpers import toy_family, toy_tensors, write_recipe
from method_harness import family, merge_in_memory
from neuromerge_cli import cpu_threads
from neuromerge_cli.cli import app
from neuromerge_cli.methods import get_method
from neuromerge_cli.methods import subspaces
from neuromerge_cli.methods.subspaces import neuron_merge, orthogonal_merge

FNS = ("elect_mean", "elect_sum", "mean", "sum")


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    for n, w in want.items():
        scale = max(float(w.abs().max()), 1e-30)
        err = float((got[n].double() - w).abs().max())
        assert err <= rtol * scale, f"{n}: max abs difference {err:.3g} > {rtol:g} × scale {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tasks", range(1, 9))
def test_matches_per_row_reference(num_tasks: int, dtype: torch.dtype) -> None:
    merge_fn = FNS[num_tasks % 4]
    density = (0.15, 0.4, 0.7)[num_tasks % 3]
    params = {"density": density, "lambda1": 0.7, "merge_fn": merge_fn}
    base, tasks = family(num_tasks, seed=num_tasks, dtype=dtype)
    got, report, _ = merge_in_memory("neuromerging", params, base, tasks)
    want, sigma, lam2 = ref.neuromerging(base, tasks, density=density, lambda1=0.7, merge_fn=merge_fn)
    assert_close(got, want)
    assert report["sigma"] == pytest.approx(max(sigma), rel=1e-9)
    assert report["lambda2"] == pytest.approx(lam2, rel=1e-9)


@pytest.mark.parametrize("merge_fn", FNS)
def test_weights_and_tensor_scope_match_reference(merge_fn: str) -> None:
    base, tasks = family(4, seed=11)
    weights = [0.5, 2.0, 1.0, 1.5]
    params = {"density": 0.3, "mask_scope": "tensor", "lambda1": 0.4, "lambda2": 1.7, "lambda_point": 0.9,
              "merge_fn": merge_fn}
    got, _, _ = merge_in_memory("neuromerging", params, base, tasks, weights)
    want, _, _ = ref.neuromerging(base, tasks, density=0.3, scope="tensor", lambda1=0.4, lambda2=1.7,
                                  lambda_point=0.9, merge_fn=merge_fn, weights=weights)
    assert_close(got, want)


def test_task_order_invariance() -> None:
    base, tasks = family(5, seed=3)
    weights = [1.0, 2.0, 0.5, 1.0, 3.0]
    params = {"density": 0.3, "lambda1": 0.5}
    got, _, _ = merge_in_memory("neuromerging", params, base, tasks, weights)
    order = [3, 0, 4, 2, 1]
    permuted, _, _ = merge_in_memory("neuromerging", params, base, [tasks[i] for i in order],
                                     [weights[i] for i in order])
    assert_close(permuted, {n: t.double() for n, t in got.items()}, rtol=1e-6)


def test_identity_is_task_arithmetic() -> None:
    base, tasks = family(3, seed=5)
    weights = [1.0, 0.5, 2.0]
    params = {"density": 1.0, "lambda1": 1.0, "lambda2": 1.0, "merge_fn": "sum"}
    got, report, _ = merge_in_memory("neuromerging", params, base, tasks, weights)
    want = {n: sum(w * (t[n].double() - base[n].double()) for w, t in zip(weights, tasks)) for n in base}
    assert_close(got, want)
    assert report["sigma"] == 0.0 and report["lambda_point"] == 1.0


def test_zero_base_rows_and_rank_deficient_rows() -> None:
    base, tasks = family(4, seed=7)
    base["lin.weight"][[0, 5]] = 0.0  # zero base rows
    base["conv.weight"][1] = 0.0
    for t in tasks[1:]:
        t["lin.weight"][0] = tasks[0]["lin.weight"][0]  # identical task rows (rank 1 over a zero base row)
    tasks[2]["lin.weight"][3] = base["lin.weight"][3]  # task 2 unchanged in row 3
    tasks[3]["lin.weight"][3] = base["lin.weight"][3] + 0.3 * (tasks[1]["lin.weight"][3] - base["lin.weight"][3])
    tasks[1]["lin.weight"][7] = 2.0 * base["lin.weight"][7]  # purely parallel change
    got, _, stats = merge_in_memory("neuromerging", {"density": 0.6, "lambda1": 1.0}, base, tasks)
    want, _, _ = ref.neuromerging(base, tasks, density=0.6, lambda1=1.0)
    assert all(torch.isfinite(t).all() for t in got.values())
    assert_close(got, want)
    assert stats["lin.weight"]["mean_orthogonal_rank"] < 4


def test_rows_trimmed_to_zero_stay_at_base() -> None:
    base, tasks = family(3, seed=8)
    for t in tasks:
        t["lin.weight"][4] = base["lin.weight"][4] + 1e-4 * torch.randn(10)  # tiny: trimmed away
    got, _, _ = merge_in_memory("neuromerging", {"density": 0.2, "lambda1": 1.0}, base, tasks)
    assert torch.equal(got["lin.weight"][4], torch.zeros(10))


def test_sixteen_tasks_match_reference() -> None:
    base, tasks = family(16, seed=16, out=6, width=24)
    got, _, stats = merge_in_memory("neuromerging", {"density": 0.5, "lambda1": 0.3}, base, tasks)
    want, _, _ = ref.neuromerging(base, tasks, density=0.5, lambda1=0.3)
    assert_close(got, want)
    assert stats["lin.weight"]["mean_orthogonal_rank"] == 16.0


def test_lambda2_auto_from_sigma() -> None:
    base, tasks = family(3, seed=9)
    tasks[1] = {n: base[n] + 3.0 * (t - base[n]) for n, t in tasks[1].items()}
    _, report, _ = merge_in_memory("neuromerging", {}, base, tasks)
    # σ_t directly: the L1 share of τ_t below its global top-15% threshold
    sigma = []
    for t in tasks:
        flat = torch.cat([(t[n] - base[n]).reshape(-1) for n in base]).abs().double()
        k = math.floor(0.15 * flat.numel())
        kept = torch.sort(flat, descending=True).values[:k].sum()
        sigma.append(float(1 - kept / flat.sum()))
    assert report["trim"]["sigma"] == pytest.approx(sigma, rel=1e-6)
    assert report["sigma"] == pytest.approx(max(sigma), rel=1e-6)
    assert report["lambda2"] == pytest.approx(1 / (1 - max(sigma)), rel=1e-6)
    assert report["lambda2_auto"] is True and report["lambda_point"] == report["lambda2"]


def test_chunked_rows_equal_one_block() -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(37, 16, generator=g)
    tau = torch.randn(5, 37, 16, generator=g) * (torch.rand(5, 37, 16, generator=g) < 0.5)
    w = torch.ones(5)
    whole = neuron_merge(base, tau, w, "elect_mean")
    chunked = neuron_merge(base, tau, w, "elect_mean", budget=5 * 16 * 4)
    assert torch.equal(whole.parallel, chunked.parallel)
    assert torch.allclose(whole.orthogonal, chunked.orthogonal, rtol=0, atol=1e-6)
    assert whole.stats["mean_orthogonal_rank"] == chunked.stats["mean_orthogonal_rank"]


def test_basis_sign_flips_do_not_change_the_reference() -> None:
    """The SPEC's claim, checked on the SVD reference: flipping basis vectors changes nothing without ties."""
    g = torch.Generator().manual_seed(2)
    p = torch.randn(5, 20, generator=g, dtype=torch.float64) * (torch.rand(5, 20, generator=g) < 0.6)
    w = [1.0, 2.0, 1.0, 0.5, 1.0]
    for fn in FNS:
        plain = ref.orthogonal_row(p, w, fn)
        for _ in range(4):
            flips = torch.where(torch.rand(5, generator=g) < 0.5, -1.0, 1.0).double()
            assert torch.allclose(ref.orthogonal_row(p, w, fn, flips), plain, atol=1e-12)
        got = orthogonal_merge(p.unsqueeze(0), torch.tensor(w), fn)[0]
        assert torch.allclose(got, plain, atol=1e-10)


def test_tie_direction_gives_zero_not_an_orientation_dependent_sign() -> None:
    """With a tie (Σ_t c_tj = 0) the SPEC's majority fallback depends on the basis signs; we give 0."""
    v = torch.linalg.qr(torch.randn(12, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)).Q
    coords = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)  # direction 0 ties
    p = coords @ v.T
    w = [1.0, 1.0, 1.0]
    literal = [ref.merge_in_basis(p, v * torch.tensor(f, dtype=torch.float64), w, "elect_mean", 2.0, "majority")
               for f in ([1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0])]
    assert max(float((a - b).abs().max()) for a in literal for b in literal) > 0.5
    got = orthogonal_merge(p.unsqueeze(0), torch.ones(3), "elect_mean")[0]
    assert torch.allclose(got, v[:, 1], atol=1e-10)  # direction 0 → 0, direction 1 → mean of (1, 1, 1)
    assert torch.allclose(got, ref.orthogonal_row(p, w, "elect_mean"), atol=1e-10)


def test_report_fields() -> None:
    base, tasks = family(3, seed=4)
    _, report, stats = merge_in_memory("neuromerging", {"density": 0.3}, base, tasks)
    assert {"trim", "sigma", "lambda1", "lambda2", "lambda2_auto", "lambda_point"} <= set(report)
    assert len(report["trim"]["threshold"]) == 3 and len(report["trim"]["kept_fraction"]) == 3
    s = stats["lin.weight"]
    for t in range(3):
        assert s["parallel_share"][t] + s["orthogonal_share"][t] == pytest.approx(1.0)
    assert 0.0 <= s["sign_conflict"] <= 1.0 and 1.0 <= s["mean_orthogonal_rank"] <= 3.0
    assert "sign_conflict" in stats["lin.bias"]


def test_bad_parameters_are_errors() -> None:
    from neuromerge_cli.errors import MergeError

    m = get_method("neuromerging")
    for raw in ({"lambda2": "big"}, {"merge_fn": "max"}, {"density": 0}, {"lambda_point": -1}, {"lambda_point": "auto"}, {"lambda3": 1}):
        with pytest.raises(MergeError):
            m.parse_params(raw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu() -> None:
    base, tasks = family(4, seed=12, out=64, width=48)
    cpu, _, _ = merge_in_memory("neuromerging", {"density": 0.3, "lambda1": 0.5}, base, tasks)
    gpu, _, _ = merge_in_memory("neuromerging", {"density": 0.3, "lambda1": 0.5}, base, tasks, device="cuda")
    assert_close(gpu, {n: t.double() for n, t in cpu.items()})


def test_cli_run_matches_reference(tmp_path: Path) -> None:
    base_dir, task_dirs = toy_family(tmp_path, num_tasks=3)
    recipe = write_recipe(tmp_path / "r.yaml", base_dir, task_dirs, "neuromerging",
                          {"density": 0.3, "lambda1": 0.5}, output=tmp_path / "out")
    proc = CliRunner().invoke(app, ["run", str(recipe)])
    assert proc.exit_code == 0, proc.output
    base = load_file(str(base_dir / "model.safetensors"))
    tasks = [load_file(str(d / "model.safetensors")) for d in task_dirs]
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    want, sigma, lam2 = ref.neuromerging(base, tasks, density=0.3, lambda1=0.5)
    assert_close({n: merged[n].double() - base[n].double() for n in want}, want)
    assert torch.equal(merged["position_ids"], toy_tensors(0)["position_ids"])
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["global"]["lambda2"] == pytest.approx(lam2) and report["global"]["lambda1"] == 0.5
    assert [r["sigma"] for r in report["tasks"]] == pytest.approx(sigma)
    assert all("kept_fraction" in r and "threshold" in r for r in report["tasks"])
    assert report["tensors"]["layer.0.weight"]["role"] == "neuron"
    assert "mean_orthogonal_rank" in report["tensors"]["layer.0.weight"]
    assert f"lambda2={lam2:.4g} (auto)" in proc.output and "most sign conflict" in proc.output


def test_scale_variants_share_one_merge_pass(tmp_path: Path) -> None:
    """λ values for a sweep come from the same parts: each variant equals the reference at its λs."""
    from neuromerge_cli.engine import MergeOptions, Variant, merge_variants, prepare
    from neuromerge_cli.recipe import load_recipe

    base_dir, task_dirs = toy_family(tmp_path, num_tasks=2)
    recipe = write_recipe(tmp_path / "r.yaml", base_dir, task_dirs, "neuromerging", {"density": 0.4})
    variants = [Variant(tmp_path / "auto"), Variant(tmp_path / "fixed", {"lambda1": 0.5, "lambda2": 2.0}),
                Variant(tmp_path / "point", {"lambda_point": 0.25})]
    reports = merge_variants(prepare(load_recipe(recipe)), MergeOptions(output=tmp_path / "auto"), variants)
    base = load_file(str(base_dir / "model.safetensors"))
    tasks = [load_file(str(d / "model.safetensors")) for d in task_dirs]
    for v, kwargs in zip(variants, [{}, {"lambda1": 0.5, "lambda2": 2.0}, {"lambda_point": 0.25}]):
        merged = load_file(str(v.output / "model.safetensors"))
        want, _, lam2 = ref.neuromerging(base, tasks, density=0.4, **kwargs)
        assert_close({n: merged[n].double() - base[n].double() for n in want}, want)
    assert reports[1]["global"]["lambda2"] == 2.0 and reports[1]["global"]["lambda2_auto"] is False
    assert reports[2]["global"]["lambda_point"] == 0.25 and reports[2]["global"]["lambda2_auto"] is True


def test_per_row_work_runs_on_one_cpu_thread_with_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2048, 9, 40, dtype=torch.float64, generator=g)  # T = 8: (2048, 9, 9) Gram matrices
    gram = q @ q.transpose(1, 2)
    weights = torch.ones(8, dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        threaded = subspaces._row_coefficients(gram, weights, "elect_mean")  # torch's ops split over 2 threads
        seen: list[int] = []
        eigh = torch.linalg.eigh
        monkeypatch.setattr(torch.linalg, "eigh", lambda m: (seen.append(torch.get_num_threads()), eigh(m))[1])
        serial = subspaces.row_coefficients(gram, weights, "elect_mean")
        assert seen == [1 if cpu_threads.OPENMP else 2] and torch.get_num_threads() == 2  # set back after
    finally:
        torch.set_num_threads(before)
    for a, b in [(threaded.a, serial.a), (threaded.z, serial.z), (threaded.chunk.y, serial.chunk.y),
                 (threaded.chunk.rank, serial.chunk.rank), (threaded.parallel_energy, serial.parallel_energy)]:
        assert torch.equal(a, b)
