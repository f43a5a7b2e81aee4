"""tsv: TSV-Merge against a per-tensor float64 reference written from the description, and its properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import fine_tune, run_engine_merge, toy_family, toy_tensors, write_model

from neuromerge_cli.methods import TensorJob, get_method


def polar_np(a: np.ndarray) -> np.ndarray:
    p, _, qh = np.linalg.svd(a, full_matrices=False)
    return p @ qh


def reference_tsv(taus: list[np.ndarray]) -> np.ndarray:
    """Each task's top ⌊r/T⌋ singular triplets, concatenated, U and V orthogonalised; else the mean."""
    if taus[0].ndim != 2 or min(taus[0].shape) < len(taus):
        return np.mean(taus, axis=0)
    k = min(taus[0].shape) // len(taus)
    us, ss, vhs = [], [], []
    for tau in taus:
        u, s, vh = np.linalg.svd(tau, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    return polar_np(np.hstack(us)) @ np.diag(np.concatenate(ss)) @ polar_np(np.vstack(vhs))


def task_deltas(base: dict, tasks: list[dict], name: str) -> list[np.ndarray]:
    return [(sd[name].float() - base[name].float()).double().numpy() for sd in tasks]


def merge_job(deltas: torch.Tensor, method: str = "tsv", **params) -> torch.Tensor:
    m = get_method(method)
    values = m.parse_params(params)
    job = TensorJob("w", "neuron", torch.zeros(deltas.shape[1:]), deltas, torch.ones(deltas.shape[0]))
    return m.merge(job, values).delta


@pytest.mark.parametrize("num_tasks,alpha", [(3, 1.0), (2, 0.6)])
def test_engine_matches_the_per_tensor_reference(tmp_path, num_tasks, alpha):
    base_path, task_paths = toy_family(tmp_path, num_tasks)
    base = toy_tensors(0)
    tasks = [fine_tune(base, t) for t in range(num_tasks)]
    merged, report = run_engine_merge(tmp_path, base_path, task_paths, "tsv", {"alpha": alpha})
    for name, theta0 in base.items():
        if not theta0.is_floating_point():
            assert torch.equal(merged[name], theta0)
            continue
        expected = theta0.double().numpy() + alpha * reference_tsv(task_deltas(base, tasks, name))
        np.testing.assert_allclose(merged[name].double().numpy(), expected, rtol=1e-5, atol=2e-6, err_msg=name)
    assert report["tensors"]["layer.0.weight"]["svd_rank_per_task"] == 8 // num_tasks


def test_one_task_gives_its_own_task_vector():
    tau = torch.randn(1, 12, 7, dtype=torch.float32)
    torch.testing.assert_close(merge_job(tau), tau[0], rtol=1e-5, atol=1e-5)


def test_tasks_in_orthogonal_subspaces_add_up_exactly():
    """Rank-≤k tasks on disjoint rows and columns: concatenated U, V are already orthonormal, so TSV = Σ τ_t."""
    g = torch.Generator().manual_seed(1)
    deltas = torch.zeros(3, 12, 9)
    for t in range(3):  # rank 3 = ⌊9/3⌋ each, on rows 4t..4t+3 and columns 3t..3t+2
        deltas[t, 4 * t:4 * t + 4, 3 * t:3 * t + 3] = torch.randn(4, 3, generator=g)
    torch.testing.assert_close(merge_job(deltas), deltas.sum(0), rtol=1e-5, atol=1e-5)


def test_task_order_does_not_matter():
    deltas = torch.randn(4, 10, 14, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(merge_job(deltas[[2, 0, 3, 1]]), merge_job(deltas), rtol=1e-4, atol=1e-5)


def test_small_matrices_and_other_tensors_are_averaged():
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(3, 2, 9, generator=g)  # r = 2 < T = 3: no component per task
    conv = torch.randn(3, 4, 2, 3, 3, generator=g)
    bias = torch.randn(3, 5, generator=g)
    for deltas in (wide, conv, bias):
        torch.testing.assert_close(merge_job(deltas), deltas.mean(0))


def test_float64_svds_agree_and_common_weights_do_not_matter():
    deltas = torch.randn(3, 16, 8, generator=torch.Generator().manual_seed(4))
    single = merge_job(deltas)
    torch.testing.assert_close(merge_job(deltas, svd_dtype="float64"), single, rtol=1e-4, atol=1e-5)
    m = get_method("tsv")
    job = TensorJob("w", "neuron", torch.zeros(16, 8), deltas, torch.full((3,), 2.5))
    torch.testing.assert_close(m.merge(job, m.parse_params({})).delta, single)


def test_unequal_weights_scale_the_tasks(tmp_path):
    g = torch.Generator().manual_seed(6)
    base = {"w": torch.randn(9, 6, generator=g)}
    write_model(tmp_path / "base", base)
    tasks = [{"w": base["w"] + 0.1 * torch.randn(9, 6, generator=g)} for _ in range(3)]
    paths = [write_model(tmp_path / f"t{t}", sd) for t, sd in enumerate(tasks)]
    weights = [1.0, 2.0, 3.0]
    merged, _ = run_engine_merge(tmp_path, tmp_path / "base", paths, "tsv", weights=weights)
    rel = [3 * w / sum(weights) for w in weights]  # weights are relative: scaled to mean 1
    taus = [r * d for r, d in zip(rel, task_deltas(base, tasks, "w"))]
    np.testing.assert_allclose(merged["w"].double().numpy(), base["w"].double().numpy() + reference_tsv(taus),
                               rtol=1e-5, atol=2e-6)


def test_a_failed_svd_is_a_merge_error_naming_the_tensor(monkeypatch):
    from neuromerge_cli.errors import MergeError

    def fail(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", fail)
    with pytest.raises(MergeError, match="tensor 'w': SVD failed .*svd_dtype: float64"):
        merge_job(torch.randn(2, 4, 4))


def test_a_task_that_left_the_layer_frozen_does_not_bend_the_others():
    """τ_2 = 0 has arbitrary singular vectors; left out, TSV gives τ_1's top-⌊r/T⌋ truncation."""
    tau = torch.randn(10, 8, generator=torch.Generator().manual_seed(10))
    deltas = torch.stack([tau, torch.zeros_like(tau)])
    u, s, vh = torch.linalg.svd(tau.double(), full_matrices=False)
    truncated = (u[:, :4] * s[:4]) @ vh[:4]  # k = ⌊8/2⌋
    torch.testing.assert_close(merge_job(deltas).double(), truncated, rtol=1e-4, atol=1e-5)
    assert torch.equal(merge_job(torch.zeros(2, 6, 5)), torch.zeros(6, 5))
