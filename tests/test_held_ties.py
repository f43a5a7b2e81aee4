"""Ties held until the merge read is over in an unnamed file, read back as they were."""

from __future__ import annotations

from pathlib import Path

import torch

from neuromerge_cli.held_ties import HeldTies
from neuromerge_cli.methods.elect import MAJORITIES, DeferredMajority


def block(seed: int, count: int, guess: float) -> DeferredMajority:
    g = torch.Generator().manual_seed(seed)
    d = DeferredMajority(lambda _: None, guess, None, "lambda")
    d.keep(torch.randperm(1000, generator=g)[:count], torch.randn(count, generator=g),
           {m: torch.randn(count, generator=g) for m in MAJORITIES})
    return d


def test_held_ties_come_back_as_they_were_added_by_tensor(tmp_path: Path) -> None:
    added = [("a", 0, block(1, 7, 1.0)), ("b", 0, block(2, 30, -1.0)), ("a", 4, block(3, 1, 1.0)),
             ("c", 2, block(4, 12, 1.0))]
    held = HeldTies(tmp_path)
    for name, row, deferred in added:
        held.add(name, row, deferred)
    assert len(held) == 4 and list(tmp_path.iterdir()) == []  # the file has no name in the folder
    got = list(held.by_tensor())
    assert [name for name, _ in got] == ["a", "b", "c"]  # in the order of their first block
    want = {"a": [added[0], added[2]], "b": [added[1]], "c": [added[3]]}
    for name, blocks in got:
        assert [row for row, _ in blocks] == [row for _, row, _ in want[name]]
        for (_, back), (_, _, sent) in zip(blocks, want[name]):
            assert back.guess == sent.guess and back.part == sent.part
            assert torch.equal(back.positions, sent.positions) and torch.equal(back.base_values, sent.base_values)
            assert all(torch.equal(back.candidates[m], sent.candidates[m]) for m in MAJORITIES)
    held.close()
