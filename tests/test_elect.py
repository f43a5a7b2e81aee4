"""Sign election and the merge functions ψ, on hand-worked examples."""

from __future__ import annotations

import pytest
import torch

from neuromerge_cli.methods.elect import (DeferredMajority, elected_sign_sum, elected_signs, merge_values,
                                          sign_conflict_rate, ties_with_values, weighted_sum)

# three tasks, five coordinates
X = torch.tensor([
    [1.0, -2.0, 0.0, 3.0, 1.0],
    [3.0, 1.0, 0.0, -3.0, -1.0],
    [0.0, -2.0, 0.0, 0.0, 0.0],
])


def test_elected_signs_with_majority_fallback() -> None:
    # sums 4, -3, 0, 0, 0 → signs +, -, 0, 0, 0; majority sign(+1 - 1) = 0 → the zeros stay 0
    assert elected_signs(X).tolist() == [1.0, -1.0, 0.0, 0.0, 0.0]
    # a given majority fills the zero sums
    assert elected_signs(X, majority=-1.0).tolist() == [1.0, -1.0, -1.0, -1.0, -1.0]
    y = X.clone()
    y[2, 1] = 2.0  # sums 4, 1, 0, 0, 0 → the tensor leans + → the zero sums become +
    assert elected_signs(y).tolist() == [1.0, 1.0, 1.0, 1.0, 1.0]


def test_group_dims_elect_per_row() -> None:
    x = torch.tensor([[[1.0, 0.0], [-1.0, -2.0]], [[0.0, 0.0], [1.0, 0.0]]])  # (T=2, rows=2, cols=2)
    # row 0: sums (1, 0) → majority + → (+, +); row 1: sums (0, -2) → majority - → (-, -)
    assert elected_signs(x, group_dims=(1,)).tolist() == [[1.0, 1.0], [-1.0, -1.0]]


@pytest.mark.parametrize("fn, expected", [
    ("elect_mean", [2.0, -2.0, 0.0, 3.0, 1.0]),
    ("elect_sum", [4.0, -4.0, 0.0, 3.0, 1.0]),
    ("mean", [4 / 3, -1.0, 0.0, 0.0, 0.0]),
    ("sum", [4.0, -3.0, 0.0, 0.0, 0.0]),
])
def test_merge_functions_hand_worked(fn: str, expected: list[float]) -> None:
    got = merge_values(X, torch.ones(3), fn, majority=1.0)
    assert got.tolist() == pytest.approx(expected)


def test_weighted_elect_mean_is_the_weight_normalised_mean_of_the_agreeing_values() -> None:
    x = torch.tensor([[2.0], [4.0], [-1.0]])
    w = torch.tensor([1.0, 3.0, 1.0])
    # weighted values 2, 12, -1 → sign +; agreeing tasks 0 and 1: (2 + 12) / (1 + 3)
    assert merge_values(x, w, "elect_mean").item() == pytest.approx(3.5)
    assert merge_values(x, w, "elect_sum").item() == pytest.approx(14.0)
    assert merge_values(x, w, "mean").item() == pytest.approx(13 / 5)
    assert merge_values(x, w, "sum").item() == pytest.approx(13.0)


def test_sign_conflict_rate() -> None:
    assert sign_conflict_rate(X) == pytest.approx(3 / 5)  # coordinates 0 and 2 agree
    assert sign_conflict_rate(torch.zeros(2, 0)) == 0.0


def test_a_majority_function_is_asked_only_when_a_nonzero_coordinate_ties() -> None:
    asked: list[int] = []

    def majority() -> float:
        asked.append(1)
        return -1.0

    w = torch.ones(2)
    no_tie = torch.tensor([[1.0, 0.0], [2.0, 0.0]])  # the all-zero coordinate is 0 whatever m is
    assert torch.equal(merge_values(no_tie, w, "elect_mean", majority=majority), torch.tensor([1.5, 0.0]))
    assert not asked
    tie = torch.tensor([[1.0, 3.0], [-1.0, 1.0]])
    assert torch.equal(merge_values(tie, w, "elect_mean", majority=majority), torch.tensor([-1.0, 2.0]))
    assert asked == [1]


@pytest.mark.parametrize("shape", [(3, 5, 4), (2, 7), (4,), (3, 0, 2)])
def test_weighted_sum_matches_a_float64_sum_over_tasks(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen)
    w = torch.rand(shape[0], generator=gen) + 0.5
    expected = (x.double() * w.double().reshape((-1,) + (1,) * (x.ndim - 1))).sum(0)
    got = weighted_sum(x, w)
    assert got.shape == x.shape[1:] and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)


def _psi_reference(values: torch.Tensor, weights: torch.Tensor, merge_fn: str, majority: float) -> torch.Tensor:
    """ψ coordinate by coordinate, in plain Python floats, straight from the SPEC."""
    t, n = values.shape
    out = []
    for j in range(n):
        x = [float(weights[i]) * float(values[i, j]) for i in range(t)]
        total = sum(x)
        s = (total > 0) - (total < 0) or majority
        agree = [i for i in range(t) if x[i] != 0 and ((x[i] > 0) - (x[i] < 0)) == s]
        summed = sum(x[i] for i in agree)
        if merge_fn == "elect_sum":
            out.append(summed)
        else:
            count = sum(float(weights[i]) for i in agree)
            out.append(summed / count if count > 0 else 0.0)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("merge_fn", ["elect_mean", "elect_sum"])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0, 1.0], [0.5, 2.0, 1.0, 1.5]])
@pytest.mark.parametrize("majority", [1.0, -1.0, 0.0])
def test_elections_match_a_per_coordinate_reference_with_ties(merge_fn: str, weights: list[float], majority: float) -> None:
    gen = torch.Generator().manual_seed(3)
    values = torch.randint(-2, 3, (4, 400), generator=gen).float()  # small integers: many zero sums
    values[:, :5] = 0.0  # nothing to elect: the result must be +0.0 whatever the majority
    w = torch.tensor(weights)
    got = merge_values(values, w, merge_fn, majority=majority)
    torch.testing.assert_close(got.double(), _psi_reference(values, w, merge_fn, majority), rtol=1e-6, atol=1e-6)
    assert not torch.signbit(got[got == 0]).any()  # zeros are +0.0, as a masked sum gives


@pytest.mark.parametrize("seed", range(4))
def test_ties_with_values_matches_the_boolean_definition(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (3, 40), generator=g).float()  # small integers: many exact ties and zeros
    for cols in (slice(None), x.abs().sum(0) == 0, x.sum(0) != 0):
        part = x[:, cols]
        s = torch.sign(part.sum(0))
        assert ties_with_values(part, s) == bool(((s == 0) & (part != 0).any(dim=0)).any())


def test_ties_with_values_sees_subnormal_values() -> None:
    x = torch.tensor([[1e-45, 0.0], [-1e-45, 0.0]])  # the smallest float32 subnormals cancel
    assert ties_with_values(x, torch.sign(x.sum(0)))
    assert not ties_with_values(x[:, 1:], torch.zeros(1))


def test_sign_conflict_rate_counts_tiny_values() -> None:
    x = torch.tensor([[1e-30, 0.0, 2.0], [-1e-30, 0.0, 3.0]])
    assert sign_conflict_rate(x) == pytest.approx(1 / 3)


def test_sign_conflict_rate_matches_its_definition_on_random_values_with_zeros_inf_and_nan() -> None:
    g = torch.Generator().manual_seed(9)
    x = torch.randn(4, 5000, generator=g)
    x = torch.where(torch.rand(x.shape, generator=g) < 0.4, 0.0, x)
    x[1, :30] = float("nan")
    x[2, 40:60] = float("-inf")
    x[0, 100:110] = 1e-45  # subnormal
    finite_rows = ~x.isnan().any(dim=0)
    conflict = (x < 0).any(dim=0) & (x > 0).any(dim=0) & finite_rows  # a NaN coordinate never conflicts
    assert sign_conflict_rate(x) == int(conflict.sum()) / 5000
    assert sign_conflict_rate(x[:1]) == 0.0  # one task cannot disagree with itself


@pytest.mark.parametrize("merge_fn", ["elect_mean", "elect_sum"])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0, 1.0], [0.5, 2.0, 1.0, 0.25]])
@pytest.mark.parametrize("ties", [0, 1, 40])
def test_a_deferred_majority_keeps_what_every_majority_would_give(merge_fn: str, weights: list[float], ties: int) -> None:
    g = torch.Generator().manual_seed(ties)
    x = torch.randint(1 if ties == 1 else -3, 4, (4, 20, 9), generator=g).float() / 4  # ties=1: a single tie
    flat = x.view(4, -1)
    cols = torch.randperm(flat.shape[1], generator=g)[:ties]
    flat[:, cols] = torch.tensor([[1.0], [-0.5], [-0.5], [0.0]]) / torch.tensor(weights)[:, None]  # Σ w x = 0
    w = torch.tensor(weights)
    base = torch.randn(20, 9, generator=g)
    tied = ties_with_values(x * w[:, None, None], torch.sign((x * w[:, None, None]).sum(0)))
    assert tied or not ties
    added: list[float] = []
    for guess in (1.0, -1.0):
        deferred = DeferredMajority(added.append, guess, base, "lambda")
        got = merge_values(x, w, merge_fn, majority=deferred)
        assert torch.equal(got, merge_values(x, w, merge_fn, majority=guess if tied else 0.0))
        assert added[-1] == elected_sign_sum(x, w)  # the block's Σ of elected signs, for the tensor's total
        if not tied:
            assert deferred.positions is None
            continue
        positions = deferred.positions
        assert positions is not None and set(positions.tolist()) >= set(cols.tolist())
        assert ties != 1 or positions.numel() == 1
        assert torch.equal(deferred.base_values, base.view(-1)[positions])
        for m in (1.0, -1.0, 0.0):  # bit for bit what an election told m gives at the tied coordinates
            assert torch.equal(deferred.candidates[m], merge_values(x, w, merge_fn, majority=m).view(-1)[positions])
