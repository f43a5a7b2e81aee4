"""Exact top-k thresholds: the streamed global threshold equals torch.kthvalue on the concatenation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuromerge_cli.topk import WINDOW_BINS, StreamingTopK, kept_count, sorted_values, tensor_thresholds
from reference import kept_k

SHAPES = [(7, 5), (13,), (3, 4, 2), (1,), (2, 3, 3, 3), (40, 9)]


def chunks(num_tasks: int, kind: str, seed: int) -> list[torch.Tensor]:
    """Magnitude chunks (T, *shape) of several shapes: continuous, tied, or spanning many exponents."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in SHAPES:
        if kind == "ties":  # few distinct values: many ties at any threshold, zeros included
            x = torch.randint(0, 4, (num_tasks, *shape), generator=g).float() * 0.25
        elif kind == "wide":  # exponents from 1e-30 to 1e6, subnormals and exact zeros
            x = torch.randn(num_tasks, *shape, generator=g) * 10 ** torch.randint(-40, 7, (num_tasks, *shape), generator=g).float()
            x[..., 0] = 0.0
        else:
            x = torch.randn(num_tasks, *shape, generator=g)
        out.append(x.abs())
    return out


def streamed(parts: list[torch.Tensor], density: float, sample: list[torch.Tensor] | None = None) -> StreamingTopK:
    """The two passes, or with a ``sample`` one aimed pass and the second only where its window misses."""
    topk = StreamingTopK(parts[0].shape[0], density)
    if sample is not None:
        topk.aim(sample)
    for p in parts:
        topk.observe_coarse(p)
    topk.end_coarse()
    if topk.resolved:
        return topk
    for p in parts:
        topk.observe_fine(p)
    topk.end_fine()
    return topk


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sorted_values_are_torch_sorts(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    x = (torch.randint(-3, 4, (3000,), generator=g) * 0.5).to(dtype)  # many ties
    x[::7] = torch.randn(x[::7].shape, generator=g).to(dtype)
    x[5], x[900], x[17] = float("nan"), float("inf"), float("-inf")
    for row in (x, x[::3]):  # strided, as kth_smallest's sample of a made row
        got = sorted_values(row)
        assert got.dtype == dtype and torch.equal(got.isnan(), row.sort().values.isnan())
        assert torch.equal(got.nan_to_num(7.0), row.sort().values.nan_to_num(7.0))


def test_kept_count() -> None:
    assert kept_count(100, 0.2) == 20
    assert kept_count(100, 0.199) == 19  # floor
    assert kept_count(100, 1e-9) == 1  # at least one
    assert kept_count(100, 1.0) == 100
    assert kept_count(7, 0.5) == 3
    # ⌊d·N⌋ of the decimal d as written: float arithmetic would give 0.29 * 100 = 28.999999999999996
    assert kept_count(100, 0.29) == 29


@pytest.mark.parametrize("kind", ["normal", "ties", "wide"])
@pytest.mark.parametrize("density", [1e-6, 0.01, 0.15, 0.2, 0.5, 0.999, 1.0])
def test_streamed_threshold_equals_kthvalue_of_the_concatenation(kind: str, density: float) -> None:
    parts = chunks(3, kind, seed=int(density * 1000) + len(kind))
    flat = torch.cat([p.reshape(3, -1) for p in parts], dim=1)
    n = flat.shape[1]
    k = kept_k(n, density)
    expected = torch.kthvalue(flat, n - k + 1, dim=1).values
    topk = streamed(parts, density)
    assert topk.n == n
    assert torch.equal(topk.thresholds, expected)
    keep = flat >= expected[:, None]
    assert topk.kept == keep.sum(1).tolist()
    assert all(kept >= k for kept in topk.kept)  # ties at the threshold are all kept
    removed = torch.where(keep, 0.0, flat).double().sum(1)
    assert torch.allclose(torch.tensor(topk.removed_l1, dtype=torch.float64), removed, rtol=1e-12, atol=0)
    assert torch.allclose(torch.tensor(topk.total_l1, dtype=torch.float64), flat.double().sum(1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", ["normal", "ties", "wide"])
@pytest.mark.parametrize("density", [1e-6, 0.15, 0.5, 0.999])
@pytest.mark.parametrize("aim", ["every entry", "every third entry", "far off"])
def test_an_aimed_first_pass_finds_the_threshold_its_window_holds(kind: str, density: float, aim: str) -> None:
    parts = chunks(3, kind, seed=int(density * 1000) + len(kind))
    flat = torch.cat([p.reshape(3, -1) for p in parts], dim=1)
    n, k = flat.shape[1], kept_k(flat.shape[1], density)
    expected = torch.kthvalue(flat, n - k + 1, dim=1).values
    signs = torch.where(torch.arange(flat.shape[1]) % 2 == 0, 1.0, -1.0)  # a sample of signed values
    sample = {"every entry": [p.reshape(3, -1) * -1.0 for p in parts], "every third entry": [flat[:, ::3] * signs[::3]],
              "far off": [flat * 1e12 + 1.0]}[aim]
    plain, aimed = streamed(parts, density), streamed(parts, density, sample)
    if aim == "far off" and kind != "wide":  # a window above every value: the second pass finds them
        assert not aimed.resolved
    assert torch.equal(aimed.thresholds, expected) and torch.equal(aimed.thresholds, plain.thresholds)
    assert aimed.kept == plain.kept and aimed.n == n
    assert torch.allclose(torch.tensor(aimed.removed_l1, dtype=torch.float64),
                          torch.tensor(plain.removed_l1, dtype=torch.float64), rtol=1e-12, atol=0)
    assert aimed.total_l1 == plain.total_l1


def test_a_window_spans_the_sample_ranks_around_the_estimate_and_at_most_window_bins() -> None:
    g = torch.Generator().manual_seed(3)
    values = torch.randn(2, 1 << 16, generator=g).abs()
    values[1] *= torch.rand(1 << 16, generator=g) ** 8  # task 1: a spread of exponents, few entries per bin
    topk = StreamingTopK(2, 0.2)
    topk.aim(list(values.split(1 << 10, dim=1)))  # 64 blocks of a uniform sample: a small standard error
    window = topk.window
    assert window is not None and window.width % (1 << 16) == 0 and 3 <= window.width >> 16 <= WINDOW_BINS
    first = (window.starts >> 16).tolist()
    for t in range(2):
        estimate = int(values[t].kthvalue(int(0.8 * values.shape[1]) + 1).values.view(torch.int32)) >> 16
        assert first[t] < estimate < first[t] + (window.width >> 16) - 1  # a bin either side at least
    assert window.fine.shape == (2 * window.width,) and not window.fine.any() and not window.below.any()
    for part in values.split(5000, dim=1):  # then one pass finds the thresholds
        topk.observe_coarse(part)
    topk.end_coarse()
    n, k = values.shape[1], kept_k(values.shape[1], 0.2)
    assert topk.resolved and torch.equal(topk.thresholds, values.kthvalue(n - k + 1, dim=1).values)
    removed = torch.where(values >= topk.thresholds[:, None], 0.0, values).double().sum(1)
    assert torch.allclose(torch.tensor(topk.removed_l1, dtype=torch.float64), removed, rtol=1e-12, atol=0)


def test_ties_at_the_threshold_keep_the_whole_tied_set() -> None:
    # 10 entries of one task: 1, 0.5 x 6, 0 x 3; d = 0.3 → k = 3; the 3rd largest is 0.5 → keep 7
    x = torch.tensor([[1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0]])
    topk = streamed([x[:, :4], x[:, 4:]], 0.3)
    assert topk.thresholds.tolist() == [0.5]
    assert topk.kept == [7]
    assert topk.removed_l1 == [0.0]


def test_one_entry_per_task_and_all_zero_tasks() -> None:
    topk = streamed([torch.tensor([[3.0], [0.0]])], 0.2)
    assert topk.thresholds.tolist() == [3.0, 0.0]
    assert topk.kept == [1, 1]


@pytest.mark.parametrize("density", [1e-6, 0.1, 0.5, 1.0])
def test_tensor_thresholds_are_the_kth_largest_per_row(density: float) -> None:
    g = torch.Generator().manual_seed(1)
    mags = torch.randint(0, 5, (3, 6, 7), generator=g).float()
    n = 42
    k = kept_k(n, density)
    thr = tensor_thresholds(mags, density)
    for t in range(3):
        values = sorted(mags[t].reshape(-1).tolist(), reverse=True)
        assert thr[t].item() == values[k - 1]


def test_empty_tensors_have_a_zero_threshold() -> None:
    assert tensor_thresholds(torch.zeros(2, 0, 4), 0.2).tolist() == [0.0, 0.0]


@settings(max_examples=8, deadline=None)
@given(
    values=st.lists(st.floats(min_value=0.0, max_value=2.0**127, allow_subnormal=True, width=32), min_size=2, max_size=60),
    cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=4),
    density=st.floats(min_value=1e-4, max_value=1.0),
)
def test_streamed_threshold_on_arbitrary_magnitudes(values: list[float], cuts: list[int], density: float) -> None:
    """Any non-negative float32 values (zeros, subnormals, huge), any chunking, any density."""
    x = torch.tensor(values, dtype=torch.float32)
    flat = torch.stack([x, x.flip(0)])  # two tasks
    bounds = sorted({0, len(values), *[min(c, len(values)) for c in cuts]})
    parts = [flat[:, a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
    topk = streamed(parts, density)
    n = len(values)
    expected = torch.kthvalue(flat, n - kept_k(n, density) + 1, dim=1).values
    assert torch.equal(topk.thresholds, expected)
    assert topk.kept == (flat >= expected[:, None]).sum(1).tolist()
