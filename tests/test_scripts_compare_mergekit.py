"""The agreement script's own measures: bf16 ulp distances and the two kinds of TIES coordinates
where the SPEC and mergekit decide differently, on hand-worked examples."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from compare_mergekit import compare, mergekit_config, ties_causes, ulps  # noqa: E402


def test_ulps_count_bfloat16_steps_across_zero() -> None:
    after = torch.tensor([1.0 + 2.0 ** -7], dtype=torch.bfloat16)  # the next bfloat16 (8-bit significand)
    a = torch.tensor([1.0, 0.0, 1.0], dtype=torch.bfloat16)
    b = torch.cat([after, torch.tensor([-0.0, -1.0], dtype=torch.bfloat16)])
    assert ulps(a, b).tolist() == [1, 0, 2 * 0x3F80]  # ±0 are equal; 1 → −1 crosses 2·bits(1.0)


def test_ties_causes_on_a_hand_worked_tensor() -> None:
    # N = 4, density 0.25: k = 1. Task 0: |τ| = (1, 1, .5, .125): two entries reach the 1st largest,
    # a threshold tie at coordinates 0 and 1. Task 1: (1, .5, .5, .125): only coordinate 0 is kept.
    # Kept sums: (1 − 1, 1, 0, 0) = (0, 1, 0, 0): coordinate 0 sums to zero with non-zero kept values.
    base = torch.zeros(2, 2, dtype=torch.bfloat16)
    t0 = torch.tensor([[1.0, 1.0], [0.5, 0.125]], dtype=torch.bfloat16)
    t1 = torch.tensor([[-1.0, 0.5], [0.5, 0.125]], dtype=torch.bfloat16)
    at_threshold, zero_sum = ties_causes(base, [t0, t1], 0.25)
    assert at_threshold.tolist() == [[True, True], [False, False]]
    assert zero_sum.tolist() == [[True, False], [False, False]]


def test_compare_files_every_ties_difference_under_its_cause() -> None:
    base = torch.zeros(2, 2, dtype=torch.bfloat16)
    t0 = torch.tensor([[1.0, 1.0], [0.5, 0.125]], dtype=torch.bfloat16)
    t1 = torch.tensor([[-1.0, 0.5], [0.5, 0.125]], dtype=torch.bfloat16)
    ours = {"w": torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.bfloat16)}
    theirs = {"w": torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=torch.bfloat16)}  # (0,0): tie; (1,1): neither
    row = compare("ties", ours, theirs, [{"w": base}, {"w": t0}, {"w": t1}], 0.25)
    assert (row["threshold_ties"], row["zero_sums"], row["unexplained"]) == (1, 0, 1)
    assert row["identical"] == 0.5


def test_mergekit_computes_in_float32_and_linear_has_no_base() -> None:
    models = [Path("base"), Path("a"), Path("b")]
    cfg = mergekit_config("linear", models, 0.2)
    assert (cfg["dtype"], cfg["out_dtype"], "base_model" in cfg) == ("float32", "bfloat16", False)
    ties = mergekit_config("ties", models, 0.2)
    assert ties["base_model"] == "base" and ties["models"][0]["parameters"] == {"weight": 1.0, "density": 0.2}
