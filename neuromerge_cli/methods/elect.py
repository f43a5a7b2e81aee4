"""Sign election and the TIES merge functions ψ, shared by every method that elects."""

from __future__ import annotations

from typing import Callable

import torch

from ..sums import sign_total

MERGE_FUNCTIONS = ("elect_mean", "elect_sum", "mean", "sum")


def weighted_sum(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_t w_t x_t over the task axis of ``values`` (T, *S): w_0 x_0, then one fused multiply-add per
    task (``addcmul_``) into it. On a CPU twice as fast as a matrix-vector product for a few tasks,
    as fast for eight, and it keeps the weights on the device (no sync)."""
    w = weights.to(values.dtype)
    out = values[0] * w[0]
    for t in range(1, values.shape[0]):
        out.addcmul_(values[t], w[t])
    return out


def elected_signs(
    x: torch.Tensor,
    group_dims: tuple[int, ...] | None = None,
    majority: Majority = None,
) -> torch.Tensor:
    """Per-coordinate elected sign s = sign(Σ_t x_t) of weighted values ``x`` (T, *S).

    Where the sum is exactly zero the group's majority sign m = sign(Σ_group s) is used.
    The group is either given (``majority``, e.g. a global figure, or a function called only when
    some coordinate ties with a non-zero value — elsewhere m changes nothing) or the dims of S
    listed in ``group_dims`` (None: all of S).
    """
    s = torch.sign(x.sum(dim=0))
    if callable(majority):
        majority = majority() if ties_with_values(x, s) else 0.0
    if majority is None:
        dims = tuple(range(s.ndim)) if group_dims is None else group_dims
        majority = torch.sign(s.sum(dim=dims, keepdim=True))
    return fill_ties(s, majority)


def fill_ties(s: torch.Tensor, majority: torch.Tensor | float) -> torch.Tensor:
    """``s`` (signs of the sums, in place) with ``majority`` where it is 0; arithmetic is faster than where()."""
    majority = torch.as_tensor(majority, dtype=s.dtype, device=s.device)
    return s.add_((1 - s.abs()).mul_(majority))


def ties_with_values(x: torch.Tensor, s: torch.Tensor) -> bool:
    """Whether some coordinate of ``x`` (T, *S) sums to exactly zero (``s`` = sign of the sum is 0)
    while a value there is not zero: Σ over S of tie_mass > 0."""
    return bool(tie_mass(x, s).sum() > 0)


def tie_mass(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(1 − |s|)·Σ_t |x_t| per coordinate of ``x`` (T, *S), ``s`` the sign of its sum: > 0 exactly where
    the sum is 0 while a value is not (a tie); 0 or NaN elsewhere. Arithmetic only: the boolean masks
    and any() reductions that say the same cost four times as much on a CPU."""
    return x.abs().sum(dim=0).mul_(1 - s.abs())


def weighted_values(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """w_t · x_t of values ``values`` (T, *S), as every election computes them: ``values`` itself (not
    a copy: callers do not write to it) when every weight is 1, as x · 1 = x bit for bit."""
    if bool((weights == 1).all()):
        return values
    return values * weights.to(values.dtype).reshape((-1,) + (1,) * (values.ndim - 1))


def elected_sign_sum(values: torch.Tensor, weights: torch.Tensor) -> float:
    """Σ over the coordinates of ``values`` (T, *S) of the elected sign sign(Σ_t w_t x_t): summed over
    blocks of a group, its sign is the group's majority sign (exact: a sum of ±1 and 0)."""
    return float(sign_total(torch.sign(weighted_values(values, weights).sum(dim=0))))


def merge_values(
    values: torch.Tensor,
    weights: torch.Tensor,
    merge_fn: str,
    group_dims: tuple[int, ...] | None = None,
    majority: Majority = None,
) -> torch.Tensor:
    """ψ over the task axis of ``values`` (T, *S) with task weights ``weights`` (T,).

    ``elect_mean``: Σ w_t x_t / Σ w_t over the non-zero x_t whose sign matches the elected one
    (the plain mean of those when every weight is 1); ``elect_sum``: Σ w_t x_t over them;
    ``mean``: Σ w_t x_t / Σ w_t; ``sum``: Σ w_t x_t.
    """
    if merge_fn == "sum":
        return weighted_sum(values, weights)
    if merge_fn == "mean":
        return weighted_sum(values, weights) / weights.sum().to(values.dtype)
    if merge_fn not in MERGE_FUNCTIONS:
        raise ValueError(f"unknown merge function {merge_fn!r}")
    weighted = weighted_values(values, weights)
    count_weights = None if weighted is values else weights  # None: every weight is 1

    def merge(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        return merge_elected(x, signs, count_weights, merge_fn == "elect_mean")

    if isinstance(majority, DeferredMajority):
        return majority.merge(weighted, merge)
    return merge(weighted, elected_signs(weighted, group_dims, majority))


def merge_elected(weighted: torch.Tensor, signs: torch.Tensor, weights: torch.Tensor | None, mean: bool) -> torch.Tensor:
    """Σ of the weighted values ``weighted`` (T, *S) whose sign is the elected one ``signs`` (*S), divided
    by Σ of their weights (``weights``; None: every weight is 1) when ``mean``."""
    # s·x > 0 exactly where x is non-zero and has the elected sign s (never where s = 0), so the
    # agreeing values are relu(s·x), and Σ over them = s · Σ relu(s·x): arithmetic passes over
    # (T, *S) only, no boolean masks (each costs more than the arithmetic on a CPU).
    aligned = (weighted * signs).clamp_(min=0)
    magnitude = aligned.sum(dim=0)
    if mean:
        agree = aligned.sign_()  # 1 where a value agrees, else 0
        count = agree.sum(dim=0) if weights is None else weighted_sum(agree, weights)
        magnitude.div_(count.clamp_min_(1e-30))  # 0 / tiny = 0 where nothing agrees
    return magnitude.mul_(signs).add_(0.0)  # + 0.0 turns the −0.0 of s = −1 and nothing agreeing into +0.0


MAJORITIES = (1.0, -1.0, 0.0)  # every value a majority sign can take


class DeferredMajority:
    """The majority sign of a tensor merged in blocks of rows, known only after its last block.

    The election of one block uses a ``guess`` where Σ_t w_t x_t is exactly 0 while some x_t is not
    (a tie), and keeps, at those coordinates (``positions`` in the block, flattened), θ0 and the merged
    value under each possible majority sign (``candidates``, m → values). The block's Σ of elected
    signs goes to the tensor's total (``add``). Once the total is known, the engine mends the blocks
    whose guess was wrong (engine.mended_ties): no second read of the tensor.
    """

    def __init__(self, add: Callable[[float], None], guess: float, base: torch.Tensor, part: str) -> None:
        self.add, self.guess, self.part = add, guess, part
        self.base: torch.Tensor | None = base  # let go once merged: the engine may hold this object a while
        self.positions: torch.Tensor | None = None
        self.base_values: torch.Tensor | None = None
        self.candidates: dict[float, torch.Tensor] = {}

    def merge(self, weighted: torch.Tensor, merge: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``merge`` (weighted values, elected signs) of the block's ``weighted`` values (T, *S)."""
        base, self.base = self.base, None
        assert base is not None, "a DeferredMajority elects one block"
        s = torch.sign(weighted.sum(dim=0))
        self.add(float(sign_total(s)))
        mass = tie_mass(weighted, s)
        if not bool(mass.sum() > 0):  # ties_with_values
            return merge(weighted, fill_ties(s, 0.0))  # as elected_signs without a tie
        positions = (mass.reshape(-1) > 0).nonzero().squeeze(1)
        columns = weighted.reshape(weighted.shape[0], -1)[:, positions]
        # θ0 as it was before the engine adds the merged delta into it
        self.keep(positions, base.reshape(-1)[positions],
                  tie_candidates(columns, lambda x, m: merge(x, torch.full_like(x[0], m))))
        return merge(weighted, fill_ties(s, self.guess))

    def keep(self, positions: torch.Tensor, base_values: torch.Tensor, candidates: dict[float, torch.Tensor]) -> None:
        """Keep the block's ties: their flat ``positions``, θ0 there, and their merged values under each
        majority sign (tie_candidates)."""
        self.positions, self.base_values, self.candidates = positions, base_values, candidates


def tie_candidates(columns: torch.Tensor, merge: Callable[[torch.Tensor, float], torch.Tensor]
                   ) -> dict[float, torch.Tensor]:
    """The merged values ``merge(columns, m)`` of tied coordinates (``columns``: their values (T, k)) under
    each majority sign m."""
    k = columns.shape[1]
    # Two columns at least: a (T, 1) tensor would be summed over T as a contiguous row, maybe in
    # another order than a (T, n) block, and the candidates must be the block's values bit for bit.
    padded = columns.repeat(1, 2) if k == 1 else columns
    return {m: merge(padded, m)[:k] for m in MAJORITIES}


Majority = torch.Tensor | float | Callable[[], float] | DeferredMajority | None


def sign_conflict_rate(values: torch.Tensor) -> float:
    """Share of coordinates where the non-zero task values disagree in sign (none where one is NaN)."""
    if values.numel() == 0:
        return 0.0
    # sign(max_t) − sign(min_t) is 2 exactly where min_t < 0 < max_t, else 0 or 1 (sign(NaN) = 0, and
    # amin/amax give NaN where a value is NaN): minus 1, clamped at 0, it counts the conflicts.
    # Arithmetic only; the comparisons and logical_and this replaces took 2.5 times as long on a CPU.
    spread = values.amax(dim=0).sign_().sub_(values.amin(dim=0).sign_())
    return float(sign_total(spread.sub_(1.0).clamp_min_(0.0))) / spread.numel()
