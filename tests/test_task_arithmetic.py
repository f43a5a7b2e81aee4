"""task_arithmetic through the engine against the SPEC reference, and its properties."""

from __future__ import annotations

from pathlib import Path

import torch

from helpers import dyadic_family, load_output, merge, recipe_dict, toy_family
from reference import load_folder, reference_merge


def test_matches_the_reference_with_lambda_and_signed_weights(tmp_path: Path) -> None:
    base, tasks = toy_family(tmp_path, 3)
    weights = [1.0, -0.5, 2.0]  # a negative weight subtracts a task (task negation)
    params = {"lambda": 0.6}
    merge(recipe_dict(base, tasks, "task_arithmetic", params, weights), tmp_path / "out")
    out = load_output(tmp_path / "out")
    ref = reference_merge(base, tasks, "task_arithmetic", params, weights)
    for name, t in out.items():
        torch.testing.assert_close(t.double(), ref[name].double(), rtol=0, atol=1e-6, msg=name)


def test_properties(tmp_path: Path) -> None:
    base, tasks = dyadic_family(tmp_path / "d", (1.0, 1.0, 1.0))
    merge(recipe_dict(base, tasks, "task_arithmetic", {"lambda": 0.5}), tmp_path / "a")
    merge(recipe_dict(base, [tasks[1], tasks[2], tasks[0]], "task_arithmetic", {"lambda": 0.5}), tmp_path / "b")
    a, b = load_output(tmp_path / "a"), load_output(tmp_path / "b")
    assert all(torch.equal(a[n], b[n]) for n in a)  # order invariance (exact: dyadic values)
    merge(recipe_dict(base, tasks, "task_arithmetic", {"lambda": 0.0}), tmp_path / "zero")
    theta0 = load_folder(base)
    assert all(torch.equal(t, theta0[n]) for n, t in load_output(tmp_path / "zero").items())
    gauss_base, gauss_tasks = toy_family(tmp_path / "g", 1)
    merge(recipe_dict(gauss_base, gauss_tasks, "task_arithmetic"), tmp_path / "one")
    task = load_folder(gauss_tasks[0])
    assert all(torch.equal(t, task[n]) for n, t in load_output(tmp_path / "one").items())
