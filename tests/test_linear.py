"""linear (weighted average) through the engine against the SPEC reference."""

from __future__ import annotations

from pathlib import Path

import torch

from helpers import dyadic_family, load_output, merge, recipe_dict, toy_family
from reference import load_folder, reference_merge


def test_weighted_average_matches_the_reference(tmp_path: Path) -> None:
    base, tasks = toy_family(tmp_path, 3)
    weights = [1.0, 0.5, 2.5]
    merge(recipe_dict(base, tasks, "linear", weights=weights), tmp_path / "out")
    out, ref = load_output(tmp_path / "out"), reference_merge(base, tasks, "linear", weights=weights)
    for name, t in out.items():
        torch.testing.assert_close(t.double(), ref[name].double(), rtol=0, atol=1e-6, msg=name)
    assert torch.equal(out["position_ids"], load_folder(base)["position_ids"])


def test_order_invariance_and_one_model_gives_that_model(tmp_path: Path) -> None:
    base, tasks = dyadic_family(tmp_path / "d", (1.0, 1.0, 1.0))
    merge(recipe_dict(base, tasks, "linear", weights=[1.0, 2.0, 1.0]), tmp_path / "a")
    merge(recipe_dict(base, tasks[::-1], "linear", weights=[1.0, 2.0, 1.0]), tmp_path / "b")
    a, b = load_output(tmp_path / "a"), load_output(tmp_path / "b")
    assert all(torch.equal(a[n], b[n]) for n in a)
    merge(recipe_dict(base, tasks[:1], "linear", weights=[3.0]), tmp_path / "one")
    task = load_folder(tasks[0])
    assert all(torch.equal(t, task[n]) for n, t in load_output(tmp_path / "one").items())
