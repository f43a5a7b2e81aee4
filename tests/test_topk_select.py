"""StreamingSelect: exact streamed order statistics of signed values, against a full sort."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
