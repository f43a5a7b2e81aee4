"""Streaming statistics: the trim (σ_t, thresholds, kept fractions, masks) and the majority sign."""

from __future__ import annotations

import pytest
import torch

from neuromerge_cli.stats import GlobalStat, MajoritySignStat, TrimStat
from reference import kept_k

SHAPES = [(6, 5), (11,), (2, 3, 4), ()]


def task_vectors(num_tasks: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in SHAPES:
        x = torch.randn(num_tasks, *shape, generator=g)
        x = torch.where(torch.rand(x.shape, generator=g) < 0.2, torch.round(x), x)  # ties and zeros
        out.append(x)
    return out


def run_passes(stats: list[GlobalStat], tensors: list[torch.Tensor], weights: torch.Tensor) -> None:
    """Drive the passes the way the engine does: a statistic with ``after`` runs once that one is done."""
    for stat in stats:
        for p in range(stat.passes):
            for i, x in enumerate(tensors):
                stat.observe(p, f"t{i}", x, weights)
            stat.end_pass(p)


def kth_largest(v: torch.Tensor, density: float) -> float:
    return sorted(v.tolist(), reverse=True)[kept_k(v.numel(), density) - 1]


@pytest.mark.parametrize("density", [0.05, 0.2, 0.6])
def test_global_trim_sigma_threshold_and_mask(density: float) -> None:
    tensors = task_vectors()
    trim = TrimStat(density, "global", 3, torch.device("cpu"))
    assert trim.passes == 2
    run_passes([trim], tensors, torch.ones(3))
    flat = torch.cat([x.reshape(3, -1) for x in tensors], dim=1).abs()
    for t in range(3):
        thr = kth_largest(flat[t], density)
        assert trim.thresholds[t].item() == thr
        kept = flat[t] >= thr
        sigma = float(flat[t][~kept].double().sum() / flat[t].double().sum())
        assert trim.sigma[t] == pytest.approx(sigma, rel=1e-12)
        summary = trim.summary()
        assert summary["kept_fraction"][t] == pytest.approx(float(kept.double().mean()))
        assert summary["threshold"][t] == thr
        assert summary["entries_per_task"] == flat.shape[1]
    masked = torch.cat([trim.mask(x).reshape(3, -1) for x in tensors], dim=1)
    full = torch.cat([x.reshape(3, -1) for x in tensors], dim=1)
    thresholds = torch.tensor([kth_largest(flat[t], density) for t in range(3)])
    assert torch.equal(masked, torch.where(full.abs() >= thresholds[:, None], full, 0.0))


def test_tensor_scope_trims_each_tensor_on_its_own() -> None:
    tensors = task_vectors(seed=3)
    density = 0.25
    trim = TrimStat(density, "tensor", 3, torch.device("cpu"))
    assert trim.passes == 1 and trim.thresholds is None
    run_passes([trim], tensors, torch.ones(3))
    removed = torch.zeros(3, dtype=torch.float64)
    total = torch.zeros(3, dtype=torch.float64)
    kept = torch.zeros(3)
    for x in tensors:
        m = trim.mask(x).reshape(3, -1)
        flat = x.reshape(3, -1)
        for t in range(3):
            thr = kth_largest(flat[t].abs(), density)
            expected = torch.where(flat[t].abs() >= thr, flat[t], 0.0)
            assert torch.equal(m[t], expected)
            removed[t] += (flat[t] - expected).abs().double().sum()
            total[t] += flat[t].abs().double().sum()
            kept[t] += (flat[t].abs() >= thr).sum()
    assert trim.sigma == pytest.approx((removed / total).tolist(), rel=1e-12)
    n = sum(x[0].numel() for x in tensors)
    assert trim.summary()["kept_fraction"] == pytest.approx((kept / n).tolist())


def test_density_one_keeps_everything_without_a_pass() -> None:
    trim = TrimStat(1.0, "global", 2, torch.device("cpu"))
    assert trim.passes == 0
    x = torch.randn(2, 4, 3)
    assert torch.equal(trim.mask(x), x)
    assert trim.sigma == [0.0, 0.0]
    assert trim.summary()["kept_fraction"] == [1.0, 1.0]


def test_majority_sign_is_the_sign_of_the_summed_elected_signs() -> None:
    tensors = task_vectors(seed=5)
    weights = torch.tensor([1.0, 0.5, 2.0])
    trim = TrimStat(0.3, "global", 3, torch.device("cpu"))
    majority = MajoritySignStat(trim)
    run_passes([trim, majority], tensors, weights)
    total = 0.0
    for x in tensors:
        m = trim.mask(x) * weights.reshape((-1,) + (1,) * (x.ndim - 1))
        total += float(torch.sign(m.sum(0)).sum())
    assert majority.sign == (1.0 if total > 0 else -1.0 if total < 0 else 0.0)

    # a hand-worked case: coordinates elect +, +, -, 0 → majority +
    trim = TrimStat(1.0, "global", 2, torch.device("cpu"))
    majority = MajoritySignStat(trim)
    run_passes([trim, majority], [torch.tensor([[1.0, 2.0, -3.0, 1.0], [1.0, -1.0, 1.0, -1.0]])], torch.ones(2))
    assert majority.sign == 1.0
