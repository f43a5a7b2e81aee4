"""StreamingSelect: exact streamed order statistics of signed values, against a full sort."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import needs_kernels
from neuromerge_cli import topk
from neuromerge_cli.topk import StreamingSelect, column_chunks, key_values, order_keys


def select(chunks: list[torch.Tensor], ranks) -> StreamingSelect:
    sel = StreamingSelect(chunks[0].shape[0], ranks)
    for c in chunks:
        sel.observe_coarse(c)
    sel.end_coarse()
    for c in chunks:
        sel.observe_fine(c)
    sel.end_fine()
    return sel


def test_order_keys_order_like_the_values_and_invert():
    v = torch.tensor([-float("inf"), -3e38, -2.0, -1e-45, -0.0, 0.0, 1e-45, 1e-40, 1.0, 3e38, float("inf")])
    keys = order_keys(v)
    assert bool((keys[1:] >= keys[:-1]).all())
    assert keys[4] == keys[5]  # −0.0 and +0.0 are the same value
    back = key_values(keys)
    assert torch.equal(back, v)  # −0.0 comes back as +0.0, which compares equal


def test_selects_like_a_sort_with_ties_zeros_and_chunks(monkeypatch):
    monkeypatch.setattr(topk, "SELECT_CHUNK", 211)  # force the internal chunking
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1000, generator=g)
    x[:, :50] = 0.0
    x[1, 50:60] = -0.0
    x[2, 100:300] = 1.5  # a long run of ties
    ranks = lambda n: [1, 2, 137, 500, 999, n]
    sel = select([x[:, :300], x[:, 300:301], x[:, 301:]], ranks)
    expected = x.sort(1).values[:, [k - 1 for k in ranks(1000)]]
    assert torch.equal(sel.values, expected)
    assert torch.equal(sel.at_or_below, (x.unsqueeze(1) <= expected.unsqueeze(2)).sum(2))


@settings(max_examples=15, deadline=None)
@given(
    data=st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=60),
    split=st.integers(0, 60),
    q=st.floats(0.0, 1.0),
)
def test_any_rank_matches_the_sorted_value(data, split, q):
    x = torch.tensor([data, [v * -0.5 for v in data]], dtype=torch.float32)
    n = x.shape[1]
    k = min(n, 1 + int(q * n))
    chunks = [c for c in (x[:, :split], x[:, split:]) if c.shape[1]]
    sel = select(chunks, lambda total: [k, 1, total])
    srt = x.sort(1).values
    assert torch.equal(sel.values, torch.stack([srt[:, k - 1], srt[:, 0], srt[:, -1]], 1))


def test_ranks_outside_the_count_are_refused():
    sel = StreamingSelect(1, lambda n: [n + 1])
    sel.observe_coarse(torch.ones(1, 4))
    with pytest.raises(ValueError):
        sel.end_coarse()


def test_column_chunks_cover_the_range():
    assert column_chunks(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert column_chunks(0, 4) == [slice(0, 0)]


def test_partials_summed_across_processes_give_the_whole_streams_result():
    """Two 'processes' see different chunks; summing their partials in place after each pass
    gives both the result of one selector over everything (what a distributed all-reduce does)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 900, generator=g)
    x[:, 100:200] = 0.25
    parts = [x[:, :350], x[:, 350:]]
    ranks = lambda n: [1, n // 3, n]
    procs = [StreamingSelect(2, ranks) for _ in parts]
    for pass_index, (observe, end) in enumerate([("observe_coarse", "end_coarse"), ("observe_fine", "end_fine")]):
        for proc, part in zip(procs, parts):
            getattr(proc, observe)(part)
        summed = [sum(ts) for ts in zip(*(proc.partials(pass_index) for proc in procs))]
        for proc in procs:
            for mine, total in zip(proc.partials(pass_index), summed):
                mine.copy_(total)
            getattr(proc, end)()
    expected = x.sort(1).values[:, [k - 1 for k in ranks(900)]]
    for proc in procs:
        assert proc.n == 900
        assert torch.equal(proc.values, expected)


def signed_chunks(seed: int) -> list[torch.Tensor]:
    """Chunks (3, m) of values of both signs, with zeros, a run of ties and a few far outliers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 6000, generator=g) * torch.tensor([[1e-3], [1.0], [50.0]])
    x[:, :300] = 0.0
    x[1, 1000:1600] = -0.75
    x[2, :5] = torch.tensor([1e30, -1e30, 3e-40, -3e-40, 7.0])
    return [x[:, :2500], x[:, 2500:2501], x[:, 2501:]]


SHARES = (0.0001, 0.3, 0.9999)


def ranks_of(n: int) -> list[int]:
    return [int(n * s) + 1 for s in SHARES]


@pytest.mark.parametrize("contiguous", [True, False])  # the kernels' counts, or torch's
@pytest.mark.parametrize("aim", ["every entry", "every third entry", "far off"])
def test_an_aimed_first_pass_selects_what_two_passes_do(contiguous: bool, aim: str) -> None:
    parts = [p.contiguous() if contiguous else p for p in signed_chunks(5)]
    flat = torch.cat(parts, 1)
    sample = {"every entry": parts, "every third entry": [flat[:, ::3]], "far off": [flat.abs() * 1e6 + 1e20]}[aim]
    aimed = StreamingSelect(3, ranks_of)
    aimed.aim(sample)
    for p in parts:
        aimed.observe_coarse(p)
    aimed.end_coarse()
    if aim == "every entry":
        assert aimed.resolved
    if aim == "far off":  # a window above every value: the second pass finds them
        assert not aimed.resolved
    if not aimed.resolved:
        for p in parts:
            aimed.observe_fine(p)
        aimed.end_fine()
    plain = select(parts, ranks_of)
    expected = flat.sort(1).values[:, [k - 1 for k in ranks_of(flat.shape[1])]]
    assert torch.equal(aimed.values, expected) and torch.equal(plain.values, expected)
    assert torch.equal(aimed.at_or_below, plain.at_or_below)


def test_aimed_partials_summed_across_processes_resolve_as_one_process() -> None:
    parts = [p.contiguous() for p in signed_chunks(9)]
    flat = torch.cat(parts, 1)
    procs = [StreamingSelect(3, ranks_of) for _ in range(2)]
    for proc in procs:  # every process aims with the same sample (here: every entry)
        proc.aim(parts)
    procs[0].observe_coarse(parts[0])
    for p in parts[1:]:
        procs[1].observe_coarse(p)
    summed = [sum(ts) for ts in zip(*(proc.partials(0) for proc in procs))]
    for proc in procs:
        for mine, total in zip(proc.partials(0), summed):
            mine.copy_(total)
        proc.end_coarse()
    expected = flat.sort(1).values[:, [k - 1 for k in ranks_of(flat.shape[1])]]
    for proc in procs:
        assert proc.resolved and torch.equal(proc.values, expected)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("aimed", [False, True])
def test_magnitudes_from_the_stored_inputs_select_like_a_sort(dtype: torch.dtype, aimed: bool) -> None:
    """observe_stored: |θ_t − θ0| in float32 made by the kernels from [θ0, θ_1..θ_T] as stored."""
    g = torch.Generator().manual_seed(12)
    base = torch.randn(9000, generator=g).to(dtype)
    tasks = [(base.float() + 0.01 * torch.randn(9000, generator=g)).to(dtype) for _ in range(3)]
    tasks[0][:40] = base[:40]  # exact zeros
    magnitudes = torch.stack([(t.float() - base.float()).abs() for t in tasks])
    chunks = [[x[sl] for x in (base, *tasks)] for sl in (slice(0, 4000), slice(4000, 4001), slice(4001, None))]
    sel = StreamingSelect(3, ranks_of)
    if aimed:
        sel.aim([magnitudes])
    for chunk in chunks:
        sel.observe_stored(0, chunk)
    sel.end_coarse()
    assert sel.resolved == aimed
    if not sel.resolved:
        for chunk in chunks:
            sel.observe_stored(1, chunk)
        sel.end_fine()
    expected = magnitudes.sort(1).values[:, [k - 1 for k in ranks_of(9000)]]
    assert torch.equal(sel.values, expected)
