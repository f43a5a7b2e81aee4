"""Per-tensor thresholds: the bracketed select equals a full sort's k-th largest."""

from __future__ import annotations

import pytest
import torch

from neuromerge_cli.topk import SELECT_SAMPLE, kept_count, kth_smallest, row_threshold, tensor_thresholds


def sorted_threshold(mags: torch.Tensor, density: float) -> torch.Tensor:
    flat = mags.reshape(mags.shape[0], -1)
    k = kept_count(flat.shape[1], density)
    return flat.sort(dim=1, descending=True).values[:, k - 1]


@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.97])
def test_tensor_thresholds_match_a_full_sort(density: float) -> None:
    g = torch.Generator().manual_seed(1)
    n = 6 * SELECT_SAMPLE + 123  # above the bracketing size
    mags = torch.cat([torch.randn(1, n, generator=g).abs(),
                      torch.randint(0, 5, (1, n), generator=g).float(),  # heavy ties
                      torch.zeros(1, n)])  # all equal
    assert torch.equal(tensor_thresholds(mags, density), sorted_threshold(mags, density))


def sorted_answer(row: torch.Tensor, q: int) -> tuple[float, int]:
    value = row.sort().values[q - 1]  # NaN sorts last
    return float(value), int((row < value).sum())


def assert_kth(row: torch.Tensor, q: int) -> None:
    value, below = kth_smallest(row, q)
    want_value, want_below = sorted_answer(row, q)
    assert (float(value), below) == pytest.approx((want_value, want_below), nan_ok=True), q


def test_kth_smallest_falls_back_when_the_sample_misleads() -> None:
    # the strided sample sees only the zeros; the k-th value sits among the ones in between
    n = 8 * SELECT_SAMPLE
    row = torch.zeros(n)
    row[1::2] = torch.arange(n // 2, dtype=torch.float32) + 1
    for q in (1, n // 2 + 7, n):
        assert_kth(row, q)


def test_kth_smallest_on_repeated_magnitudes_is_the_guess_or_a_bracket_on_either_side() -> None:
    # bfloat16 task vectors: few distinct magnitudes, each repeated many times
    g = torch.Generator().manual_seed(2)
    n = 6 * SELECT_SAMPLE + 5
    base = torch.randn(n, generator=g).bfloat16()
    tuned = (base.float() + 0.01 * torch.randn(n, generator=g)).bfloat16()
    mags = (tuned.float() - base.float()).abs()
    assert mags.unique().numel() < n // 20
    for q in (1, 2, n // 5, n // 2, n - n // 5 + 1, n - 1, n):
        assert_kth(mags, q)
    # continuous values: the guess is never the answer, the bracket sits below or above it
    cont = torch.rand(n, generator=g)
    for q in (3, n // 3, n - n // 10, n):
        assert_kth(cont, q)


def test_kth_smallest_counts_nan_as_the_largest_value() -> None:
    g = torch.Generator().manual_seed(3)
    n = 5 * SELECT_SAMPLE
    row = torch.rand(n, generator=g)
    row[torch.randperm(n, generator=g)[: n // 4]] = float("nan")
    row[7] = float("inf")
    for q in (1, n // 2, n - n // 4, n - n // 4 + 1, n):
        assert_kth(row, q)


@pytest.mark.parametrize("n", [0, 1, 9, 5 * SELECT_SAMPLE])
def test_row_threshold_is_the_kth_largest_and_counts_the_entries_below(n: int) -> None:
    row = torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(n)).float()
    value, below = row_threshold(row, 0.3)
    if n == 0:
        assert (float(value), below) == (0.0, 0)
        return
    k = kept_count(n, 0.3)
    assert float(value) == float(row.sort(descending=True).values[k - 1])
    assert below == int((row < value).sum())


def test_kth_smallest_refines_a_missed_guess_from_the_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Magnitudes repeated ~1000 times each, as in bfloat16 task vectors: a first guess often misses,
    and a refined one (the sample entry as many entries away as the counts say) is then the answer,
    with no select at all; with one guess, most ranks need one."""
    from neuromerge_cli import topk

    g = torch.Generator().manual_seed(4)
    n = 64 * SELECT_SAMPLE
    row = torch.randint(0, n // 1000, (n,), generator=g).float() / 7
    ranks = range(1, n + 1, n // 97)
    kthvalue = torch.kthvalue
    selects = []
    for guesses in (topk.GUESSES, 1):
        monkeypatch.setattr(topk, "GUESSES", guesses)
        selected: list[int] = []
        monkeypatch.setattr(torch, "kthvalue", lambda x, k, *a, seen=selected, **kw: seen.append(x.numel()) or kthvalue(x, k, *a, **kw))
        for q in ranks:
            assert_kth(row, q)
        selects.append(len(selected))
    assert selects[0] <= len(ranks) // 20 < len(ranks) // 2 <= selects[1]


@pytest.mark.parametrize("guesses", [0, 3])  # 0: straight to the bracket, which makes the row whole
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kth_smallest_of_stored_magnitudes_equals_that_of_the_made_row(monkeypatch: pytest.MonkeyPatch, guesses: int,
                                                                       dtype: torch.dtype) -> None:
    from neuromerge_cli import kernels, topk

    if not kernels.ENABLED:
        pytest.skip("needs the kernels")
    monkeypatch.setattr(topk, "GUESSES", guesses)
    g = torch.Generator().manual_seed(3)
    n = 6 * SELECT_SAMPLE + 5
    base = torch.randn(n, generator=g).to(dtype)
    tuned = (base.float() + 0.01 * torch.randn(n, generator=g)).to(dtype)
    stored = topk.StoredMagnitudes(tuned, base)
    mags = (tuned.float() - base.float()).abs()
    assert stored.numel() == n and torch.equal(stored.whole(), mags)
    for q in (1, n // 5, n // 2, n - 1, n):
        value, below = kth_smallest(stored, q)
        assert (float(value), below) == sorted_answer(mags, q), q
        assert stored.capped_sums(float(value)) == pytest.approx(
            (float(mags.double().sum()), float(mags.double().clamp_max(float(value)).sum())), rel=1e-12)
    for density in (0.01, 0.3):
        assert row_threshold(stored, density) == row_threshold(mags, density)
