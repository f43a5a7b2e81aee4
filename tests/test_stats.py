"""Streaming statistics: the trim (σ_t, thresholds, kept fractions, masks) and the majority sign."""

from __future__ import annotations

import pytest
import torch

from neuromerge_cli import kernels
from neuromerge_cli import stats as stats_module
from neuromerge_cli.engine import schedule
from neuromerge_cli.stats import (GlobalStat, MajoritySignStat, TaskVectorSample, TrimStat, abs_difference,
                                  float_task_vectors, task_vectors_and_norms)
from neuromerge_cli.topk import SELECT_SAMPLE
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


@pytest.mark.skipif(not kernels.ENABLED, reason="needs the kernels")
def test_global_trim_from_the_stored_inputs_equals_the_trim_of_the_task_vectors(monkeypatch: pytest.MonkeyPatch
                                                                                 ) -> None:
    """On a CPU with the kernels a global trim reads |τ| straight from the stored inputs (one sweep each
    read): the same thresholds and counts as from the float32 task vectors; per read, Σ|τ_t| for the
    engine's check of non-finite inputs (first read only)."""
    g = torch.Generator().manual_seed(9)
    stored = []
    for shape in [(40, 33), (7,), (3, 2, 5), (600, 700)]:  # the last is split over threads
        base = torch.randn(shape, generator=g)
        stored.append([base.bfloat16()] + [(base + 0.02 * torch.randn(shape, generator=g)).bfloat16()
                                           for _ in range(3)])
    deltas = [float_task_vectors(t, torch.device("cpu"))[1] for t in stored]
    plain = TrimStat(0.2, "global", 3, torch.device("cpu"))
    run_passes([plain], deltas, torch.ones(3))
    trim = TrimStat(0.2, "global", 3, torch.device("cpu"))
    assert trim.stored_inputs
    monkeypatch.setattr(kernels, "threads", lambda: 2)
    for p in range(2):
        for i, (t, d) in enumerate(zip(stored, deltas)):
            sums = trim.observe_stored(p, f"t{i}", t, torch.ones(3))
            if p == 0:
                torch.testing.assert_close(sums, d.reshape(3, -1).abs().double().sum(1), rtol=1e-12, atol=0)
            else:
                assert sums is None
        trim.end_pass(p)
    assert torch.equal(trim.thresholds, plain.thresholds)
    assert trim.summary()["kept_fraction"] == plain.summary()["kept_fraction"]
    assert trim.sigma == pytest.approx(plain.sigma, rel=1e-12)
    monkeypatch.setattr(kernels, "ENABLED", False)
    assert not TrimStat(0.2, "global", 3, torch.device("cpu")).stored_inputs


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


def bf16_task_vectors(n: int, seed: int) -> list[torch.Tensor]:
    """[θ0, θ_1..θ_3] in bfloat16, as stored: τ repeats each magnitude many times."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).bfloat16()
    return [base] + [(base.float() + 0.01 * torch.randn(n, generator=g)).bfloat16() for _ in range(3)]


@pytest.mark.parametrize("nonfinite", [False, True])
def test_tensor_scope_statistics_of_large_stored_tensors_match_a_plain_count(nonfinite: bool) -> None:
    # above the bracketing size, with NaN and Inf inputs as --allow-nonfinite lets through
    tensors = bf16_task_vectors(5 * SELECT_SAMPLE + 17, seed=4)
    if nonfinite:
        tensors[1][3] = float("inf")
        tensors[2][10:20] = float("nan")
    density = 0.3
    trim = TrimStat(density, "tensor", 3, torch.device("cpu"))
    trim.observe_stored(0, "w", tensors, torch.ones(3))
    trim.end_pass(0)
    n = tensors[0].numel()
    taus = torch.stack([x.float() - tensors[0].float() for x in tensors[1:]])
    masked = trim.mask(taus.clone(), "w")
    for t in range(3):
        mags = (tensors[t + 1].double() - tensors[0].double()).abs()
        thr = mags.float().sort(descending=True).values[kept_k(n, density) - 1]  # NaN sorts first
        keep = mags >= thr
        removed, total = float(mags[~keep].sum()), float(mags.sum())
        assert trim.summary()["kept_fraction"][t] == float(keep.sum()) / n
        assert trim.sigma[t] == pytest.approx(removed / total if total > 0 else 0.0, rel=1e-12)  # NaN: 0
        want = torch.where(keep | taus[t].isnan(), taus[t], 0.0)  # trimmed entries 0, NaN stays NaN
        torch.testing.assert_close(masked[t], want, rtol=0, atol=0, equal_nan=True)


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


def majority_chunks(kind: str, num_tasks: int, seed: int) -> list[torch.Tensor]:
    """Task vector chunks (T, ...): continuous, differences of bfloat16 weights (few low bits, many
    ties at the threshold), or a handful of values (exact ties and cancelling sums everywhere)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in [(40, 30), (257,), (6, 7, 5), (1,), (300, 4)]:
        if kind == "bf16":
            base = torch.randn(shape, generator=g).bfloat16()
            tasks = [(base.float() + 0.02 * torch.randn(shape, generator=g)).bfloat16() for _ in range(num_tasks)]
            out.append(torch.stack([t.float() - base.float() for t in tasks]))
        elif kind == "few":
            out.append(torch.randint(-2, 3, (num_tasks, *shape), generator=g).float() * 0.25)
        else:
            out.append(torch.randn(num_tasks, *shape, generator=g) * 0.01)
    return out


def majority_reference(chunks: list[torch.Tensor], weights: torch.Tensor, density: float) -> float:
    """Σ_coords sign(Σ_t w_t m_t τ_t) with the exact global thresholds, from the whole concatenation."""
    flat = torch.cat([c.reshape(c.shape[0], -1) for c in chunks], dim=1)
    n = flat.shape[1]
    thr = torch.kthvalue(flat.abs(), n - kept_k(n, density) + 1, dim=1).values
    trimmed = torch.where(flat.abs() >= thr[:, None], flat, 0.0) * weights[:, None]
    return float(torch.sign(trimmed.sum(0)).double().sum())


def run_scheduled(stats: list[GlobalStat], chunks: list[torch.Tensor], weights: torch.Tensor,
                  fresh: bool = False) -> int:
    """Drive the passes the way the engine does (shared reads, re-planned after each); ``fresh``: hand
    every statistic its own copy of a chunk (as a scoped view does). Returns the number of reads."""
    g = 0
    while g < len(passes := schedule(stats)):
        for x in chunks:
            for stat, p in passes[g]:
                stat.observe(p, "t", x.clone() if fresh else x, weights)
        for stat, p in passes[g]:
            stat.end_pass(p)
        g += 1
    return g


WEIGHTS = torch.tensor([1.0, 0.5, 2.0, 0.3, 1.7])


@pytest.mark.parametrize("kind", ["normal", "bf16", "few"])
@pytest.mark.parametrize("num_tasks", [1, 2, 3, 5])
def test_majority_after_a_global_trim_equals_the_reference(kind: str, num_tasks: int) -> None:
    chunks = majority_chunks(kind, num_tasks, seed=num_tasks)
    for weights, density in [(torch.ones(num_tasks), 0.2), (WEIGHTS[:num_tasks], 0.35)]:
        trim = TrimStat(density, "global", num_tasks, torch.device("cpu"))
        majority = MajoritySignStat(trim)
        assert run_scheduled([trim, majority], chunks, weights, fresh=kind == "few") == 3  # a read after the trim's
        assert majority.total == majority_reference(chunks, weights, density)


def stored_chunks(kind: str, seed: int) -> list[list[torch.Tensor]]:
    """Stored inputs [θ0, θ_1..θ_3] in bfloat16: differences of nearby weights (many entries at a threshold,
    exact cancellations), or a handful of values over θ0 = 0 (elected sums of exactly 0 everywhere)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in [(64, 33), (257,), (4099,), (1,)]:
        if kind == "few":
            values = torch.randint(-2, 3, (3, *shape), generator=g).float() * 0.25
            out.append([torch.zeros(shape, dtype=torch.bfloat16)] + [v.bfloat16() for v in values])
            continue
        base = (torch.randn(shape, generator=g) * 0.02).bfloat16()
        tasks = [(base.float() + 0.001 * torch.randn(shape, generator=g)).bfloat16() for _ in range(3)]
        tasks[1].view(-1)[::4] = (2 * base.view(-1)[::4].float() - tasks[0].view(-1)[::4].float()).bfloat16()
        out.append([base, *tasks])
    return out


def run_stored(stats: list[GlobalStat], stored: list[list[torch.Tensor]], weights: torch.Tensor) -> int:
    """run_scheduled over stored inputs, each statistic fed as the engine's observe_piece feeds it."""
    g = 0
    while g < len(passes := schedule(stats)):
        for tensors in stored:
            for stat, p in passes[g]:
                if stat.stored_inputs:
                    stat.observe_stored(p, "t", tensors, weights)
                else:
                    stat.observe(p, "t", float_task_vectors(tensors, torch.device("cpu"))[1], weights)
        for stat, p in passes[g]:
            stat.end_pass(p)
        g += 1
    return g


@pytest.mark.parametrize("kind", ["bf16", "few"])
@pytest.mark.parametrize("on_kernels", [True, False])
def test_majority_from_the_stored_inputs_equals_the_reference(monkeypatch: pytest.MonkeyPatch, kind: str,
                                                              on_kernels: bool) -> None:
    """The elected signs summed by kernels.merge (without writing) from the stored inputs, or by torch."""
    if on_kernels and not kernels.ENABLED:
        pytest.skip("the kernels are off")
    monkeypatch.setattr(kernels, "ENABLED", on_kernels)
    stored = stored_chunks(kind, seed=8)
    chunks = [float_task_vectors(t, torch.device("cpu"))[1] for t in stored]
    weights = WEIGHTS[:3]
    trim = TrimStat(0.3, "global", 3, torch.device("cpu"))
    majority = MajoritySignStat(trim)
    assert run_stored([trim, majority], stored, weights) == 3
    assert majority.total == majority_reference(chunks, weights, 0.3) != 0


def test_majority_partials_summed_across_processes_give_the_single_process_figure() -> None:
    """Two 'processes' observe halves of the chunks; partial sums are added up before end_pass."""
    chunks = majority_chunks("bf16", 3, seed=4) + majority_chunks("few", 3, seed=5)
    weights = WEIGHTS[:3]
    procs = [[TrimStat(0.25, "global", 3, torch.device("cpu"))] for _ in range(2)]
    for stats in procs:
        stats.append(MajoritySignStat(stats[0]))
    halves = [chunks[::2], chunks[1::2]]
    for g in range(3):
        for stats, part in zip(procs, halves):
            for x in part:
                for stat, p in schedule(stats)[g]:
                    stat.observe(p, "t", x, weights)
        lists = [[t for stat, p in schedule(stats)[g] for t in stat.partials(p) or ()] for stats in procs]
        for mine, other in zip(*lists):
            total = mine + other
            mine.copy_(total)
            other.copy_(total)
        for stats in procs:
            for stat, p in schedule(stats)[g]:
                stat.end_pass(p)
    expected = majority_reference(chunks, weights, 0.25)
    assert [stats[1].total for stats in procs] == [expected, expected]


@pytest.mark.parametrize("shape", [(7, 5), (13,), (), (0, 3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_abs_difference_in_chunks_equals_the_float32_difference(shape: tuple[int, ...], dtype: torch.dtype,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stats_module, "DIFF_CHUNK", 4)  # several chunks, the last one short
    g = torch.Generator().manual_seed(3)
    base = torch.randn(shape, generator=g).to(dtype)
    x = (base.float() + torch.randn(shape, generator=g) * 1e-2).to(dtype)
    got = abs_difference(x, base)
    assert got.dtype == torch.float32 and got.shape == base.shape
    assert torch.equal(got, (x.double() - base.double()).abs().float())  # one rounding, as the SPEC's τ


@pytest.mark.parametrize("shape", [(1,), (7, 5), (3, 40, 3), ()])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_task_vectors_and_norms_in_chunks(shape: tuple[int, ...], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stats_module, "NORM_CHUNK", 16)  # many chunks, the last one short
    gen = torch.Generator().manual_seed(len(shape))
    tensors = [torch.randn(shape, generator=gen).to(dtype) for _ in range(4)]
    base, deltas, l1, l2 = task_vectors_and_norms(tensors, torch.device("cpu"))
    want_base, want_deltas = float_task_vectors(tensors, torch.device("cpu"))
    assert torch.equal(base, want_base) and torch.equal(deltas, want_deltas)  # the same float32 values
    exact = torch.stack([t.double() - tensors[0].double() for t in tensors[1:]]).reshape(3, -1)
    assert l1.dtype == l2.dtype == torch.float64
    torch.testing.assert_close(l1, exact.abs().sum(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(l2, exact.square().sum(1).sqrt(), rtol=1e-6, atol=0)


def test_a_sample_keeps_every_stride_th_entry_of_the_whole_sample_and_aims_a_trim() -> None:
    g = torch.Generator().manual_seed(1)
    wide = [torch.randn(2, 1000, generator=g) for _ in range(3)]  # [θ0, θ_1, θ_2]
    narrow = [torch.randn(10, 7, generator=g) for _ in range(3)]
    sample = TaskVectorSample()
    sample.add(wide, 6)
    sample.add(narrow, 6)
    # entries 0, 6, ... of the 2000 + 70 in order: a block in proportion to its entries, whatever its rows' width
    kept = [torch.cat([w.reshape(-1), n.reshape(-1)])[::6] for w, n in zip(wide, narrow)]
    got = torch.cat(sample.take(), 1)
    assert torch.equal(got, torch.stack([kept[1] - kept[0], kept[2] - kept[0]])) and sample.blocks == []
    trim = TrimStat(0.2, "global", 2, torch.device("cpu"), sampled=True)
    assert trim.samples and trim.passes == 1
    trim.observe_sample("wide", wide, 6, (0, 2))
    trim.observe_sample("narrow", narrow, 6, (0, 10))
    trim.end_sample()
    assert trim.passes == 1 and trim._topk is not None and trim._topk.window is not None
    empty = TrimStat(0.2, "global", 2, torch.device("cpu"), sampled=True)
    empty.end_sample()  # nothing sampled: the two reads
    assert empty.passes == 2
