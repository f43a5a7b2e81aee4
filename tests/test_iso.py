"""iso_c / iso_cts: against per-tensor float64 references written from the description, and properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import fine_tune, run_engine_merge, toy_family, toy_tensors

from neuromerge_cli.errors import MergeError
from neuromerge_cli.methods import TensorJob, get_method
from neuromerge_cli.methods.iso import split_rank


def polar_np(a: np.ndarray) -> np.ndarray:
    p, _, qh = np.linalg.svd(a, full_matrices=False)
    return p @ qh


def defined(s: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Singular values that define their vectors (numpy's matrix_rank tolerance, in float32)."""
    return s > max(shape) * np.finfo(np.float32).eps * (s[0] if s.size else 0.0)


def reference_iso_c(taus: list[np.ndarray]) -> np.ndarray:
    if taus[0].ndim != 2:
        return np.mean(taus, axis=0)
    u, s, vh = np.linalg.svd(np.sum(taus, axis=0), full_matrices=False)
    keep = defined(s, taus[0].shape)
    return s.mean() * u[:, keep] @ vh[keep]


def reference_iso_cts(taus: list[np.ndarray], fraction: float) -> np.ndarray:
    """Top c of Σ τ_t plus each task's top k of its residual, orthogonalised, mean singular value."""
    if taus[0].ndim != 2:
        return np.mean(taus, axis=0)
    num_tasks, rank = len(taus), min(taus[0].shape)
    common = int(rank * fraction)
    k = min(round((rank - common) / num_tasks), rank // num_tasks)
    common = rank - num_tasks * k
    u, s, vh = np.linalg.svd(np.sum(taus, axis=0), full_matrices=False)
    keep = defined(s, taus[0].shape)[:common]
    u_c = u[:, :common][:, keep]
    us, ss, vhs = [u_c], [s[:common]], [vh[:common][keep]]
    for tau in taus:
        residual = tau - u_c @ u_c.T @ tau
        ut, st, vht = np.linalg.svd(residual, full_matrices=False)
        keep = defined(st, tau.shape)[:k]
        us.append(ut[:, :k][:, keep])
        ss.append(st[:k])  # the mean counts every singular value, defined or not
        vhs.append(vht[:k][keep])
    return np.concatenate(ss).mean() * polar_np(np.hstack(us)) @ polar_np(np.vstack(vhs))


def merge_job(deltas: torch.Tensor, method: str, **params) -> torch.Tensor:
    m = get_method(method)
    job = TensorJob("w", "neuron", torch.zeros(deltas.shape[1:]), deltas, torch.ones(deltas.shape[0]))
    return m.merge(job, m.parse_params(params)).delta


@pytest.mark.parametrize("method,params", [("iso_c", {}), ("iso_c", {"alpha": 1.7}), ("iso_cts", {}),
                                           ("iso_cts", {"common_fraction": 0.5, "alpha": 1.3})])
def test_engine_matches_the_per_tensor_reference(tmp_path, method, params):
    num_tasks = 3
    base_path, task_paths = toy_family(tmp_path, num_tasks)
    base = toy_tensors(0)
    tasks = [fine_tune(base, t) for t in range(num_tasks)]
    merged, _ = run_engine_merge(tmp_path, base_path, task_paths, method, params)
    alpha = params.get("alpha", 1.0)
    for name, theta0 in base.items():
        if not theta0.is_floating_point():
            assert torch.equal(merged[name], theta0)
            continue
        taus = [(sd[name].float() - theta0.float()).double().numpy() for sd in tasks]
        delta = reference_iso_c(taus) if method == "iso_c" else reference_iso_cts(taus, params.get("common_fraction", 0.8))
        np.testing.assert_allclose(merged[name].double().numpy(), theta0.double().numpy() + alpha * delta,
                                   rtol=1e-5, atol=2e-6, err_msg=name)


def test_split_rank_by_hand():
    assert split_rank(8, 3, 0.8) == (5, 1)  # c = ⌊6.4⌋ = 6; k = round(2/3) = 1; c = 8 − 3
    assert split_rank(768, 8, 0.8) == (616, 19)  # k = round(154/8 = 19.25)
    assert split_rank(10, 4, 0.8) == (10, 0)  # k = round(0.5) = 0 (half to even, as the authors)
    assert split_rank(3, 2, 0.0) == (1, 1)  # round(1.5) = 2 would exceed r: capped at ⌊r/T⌋
    assert split_rank(6, 2, 1.0) == (6, 0)


def test_iso_c_spectrum_is_flat_with_the_same_nuclear_norm():
    deltas = torch.randn(3, 12, 9, generator=torch.Generator().manual_seed(1))
    out = merge_job(deltas, "iso_c")
    s_out = torch.linalg.svdvals(out)
    s_sum = torch.linalg.svdvals(deltas.sum(0))
    torch.testing.assert_close(s_out, torch.full_like(s_out, float(s_sum.mean())), rtol=1e-5, atol=1e-5)


def test_iso_cts_spectrum_is_flat_and_keeps_the_common_subspace():
    deltas = torch.randn(4, 20, 16, generator=torch.Generator().manual_seed(2))
    out = merge_job(deltas, "iso_cts")
    q, s_out, _ = torch.linalg.svd(out.double(), full_matrices=False)
    torch.testing.assert_close(s_out, torch.full_like(s_out, float(s_out.mean())), rtol=1e-4, atol=1e-5)
    common, _ = split_rank(16, 4, 0.8)
    u_common = torch.linalg.svd(deltas.sum(0).double())[0][:, :common]
    outside = u_common - q @ (q.T @ u_common)  # the common directions lie in the merged column space
    assert float(outside.norm()) < 1e-4


def test_special_cases_reduce_to_iso_c():
    g = torch.Generator().manual_seed(3)
    one = torch.randn(1, 10, 6, generator=g)
    torch.testing.assert_close(merge_job(one, "iso_cts"), merge_job(one, "iso_c"), rtol=1e-4, atol=1e-5)
    many = torch.randn(3, 10, 6, generator=g)
    torch.testing.assert_close(merge_job(many, "iso_cts", common_fraction=1.0), merge_job(many, "iso_c"))


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_task_order_does_not_matter(method):
    deltas = torch.randn(4, 14, 10, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(merge_job(deltas[[3, 1, 0, 2]], method), merge_job(deltas, method),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_other_tensors_are_averaged_and_float64_agrees(method):
    g = torch.Generator().manual_seed(5)
    for deltas in (torch.randn(3, 4, 2, 3, generator=g), torch.randn(3, 7, generator=g)):
        torch.testing.assert_close(merge_job(deltas, method, alpha=2.0), 2.0 * deltas.mean(0))
    mat = torch.randn(3, 9, 12, generator=g)
    torch.testing.assert_close(merge_job(mat, method, svd_dtype="float64"), merge_job(mat, method),
                               rtol=1e-4, atol=1e-5)


def test_zero_task_vectors_give_zero():
    assert torch.equal(merge_job(torch.zeros(2, 5, 4), "iso_c"), torch.zeros(5, 4))


def test_common_fraction_is_checked():
    with pytest.raises(MergeError, match="parameters.common_fraction"):
        get_method("iso_cts").parse_params({"common_fraction": 1.5})


def test_a_task_that_left_the_layer_frozen_adds_no_arbitrary_directions():
    """τ_3 = 0: its residual's singular vectors are arbitrary; they are left out of the merge
    (the authors' code would give them the full mean value), while its zero singular values still
    count in the mean."""
    g = torch.Generator().manual_seed(8)
    deltas = torch.randn(3, 12, 10, generator=g)
    deltas[2] = 0.0
    out = merge_job(deltas, "iso_cts")
    expected = reference_iso_cts([d.double().numpy() for d in deltas], 0.8)
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-4, atol=1e-5)
    common, per_task = split_rank(10, 3, 0.8)
    assert int(torch.linalg.matrix_rank(out)) == common + 2 * per_task


def test_iso_c_of_an_exactly_low_rank_sum_stays_in_its_span():
    g = torch.Generator().manual_seed(9)
    a, mix, b = torch.randn(8, 2, generator=g), torch.randn(2, 2, 2, generator=g), torch.randn(2, 6, generator=g)
    deltas = a @ mix @ b  # two rank-2 task vectors in the same 2-D column and row spaces
    out = merge_job(deltas, "iso_c")
    expected = reference_iso_c([d.double().numpy() for d in deltas])
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-4, atol=1e-5)
    assert int(torch.linalg.matrix_rank(out)) == 2
