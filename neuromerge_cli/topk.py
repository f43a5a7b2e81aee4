"""Exact top-k magnitude thresholds: per tensor, and streamed over a whole model.

The streamed threshold never holds a task vector in memory. |τ| as float32 is non-negative, so
its bit pattern orders like the value. Pass 1 counts the high 16 bits (sign excluded: 32768
bins) and finds the bin holding the k-th largest value; pass 2 counts the low 16 bits of the
values in that bin, which pins the exact bit pattern of the k-th largest value.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable, Sequence

import torch

HIGH_BINS = 1 << 15
LOW_BINS = 1 << 16


def kept_count(n: int, density: float) -> int:
    """k = max(1, ⌊d·N⌋), or N when d >= 1.

    d·N is taken exactly for the decimal d the user wrote (0.29 · 100 = 29, where float
    arithmetic gives 28.999999999999996).
    """
    if density >= 1.0:
        return n
    return min(n, max(1, math.floor(Fraction(repr(float(density))) * n)))


SELECT_SAMPLE = 1 << 14  # entries of a row sampled to bracket its k-th value


def tensor_thresholds(magnitudes: torch.Tensor, density: float) -> torch.Tensor:
    """Per-row k-th largest value of ``magnitudes`` (T, ...) flattened per row: shape (T,)."""
    flat = magnitudes.reshape(magnitudes.shape[0], -1)
    n = flat.shape[1]
    k = kept_count(n, density)
    if n == 0:  # an empty tensor: nothing to keep or trim
        return flat.new_zeros(flat.shape[0])
    if k >= n:
        return flat.amin(dim=1)
    if n <= 4 * SELECT_SAMPLE:
        return torch.kthvalue(flat, n - k + 1, dim=1).values
    return torch.stack([_kth_smallest(row, n - k + 1) for row in flat])


def _kth_smallest(row: torch.Tensor, q: int) -> torch.Tensor:
    """The exact q-th smallest entry (1-based) of a 1-d tensor, in fewer passes than a full select.

    A strided sample brackets it in [lo, hi]; counting the entries below lo and selecting among
    the few in [lo, hi] is exact whenever the bracket holds it, which is checked (else a full select).
    """
    n = row.numel()
    sample = row[:: max(1, n // SELECT_SAMPLE)].sort().values
    m = sample.numel()
    frac = q / n
    margin = 4.0 * math.sqrt(m * frac * (1.0 - frac)) + 16.0
    lo = sample[max(0, int(frac * m - margin))]
    hi = sample[min(m - 1, int(frac * m + margin))]
    below = int(torch.count_nonzero(row < lo))
    inside = row[(row >= lo) & (row <= hi)]
    if below < q <= below + inside.numel():
        return torch.kthvalue(inside, q - below).values
    return torch.kthvalue(row, q).values


def _bits(magnitudes: torch.Tensor) -> torch.Tensor:
    return magnitudes.float().contiguous().view(torch.int32).reshape(magnitudes.shape[0], -1)


class StreamingTopK:
    """Exact k-th largest |x| per task over a stream of (T, ...) magnitude chunks, two passes."""

    def __init__(self, num_tasks: int, density: float, device: torch.device | str = "cpu") -> None:
        self.num_tasks = num_tasks
        self.density = density
        self.device = torch.device(device)
        self.n = 0
        self._coarse = torch.zeros(num_tasks * HIGH_BINS, dtype=torch.int64, device=self.device)
        self._coarse_l1 = torch.zeros(num_tasks * HIGH_BINS, dtype=torch.float64, device=self.device)
        self._fine = torch.zeros(num_tasks * LOW_BINS, dtype=torch.int64, device=self.device)
        self._fine_l1 = torch.zeros(num_tasks * LOW_BINS, dtype=torch.float64, device=self.device)
        self._bin: torch.Tensor | None = None
        self.thresholds: torch.Tensor | None = None
        self.kept: list[int] = []
        self.removed_l1: list[float] = []
        self.total_l1: list[float] = []

    def _offsets(self, bins: int) -> torch.Tensor:
        return (torch.arange(self.num_tasks, device=self.device) * bins).unsqueeze(1)

    def observe_coarse(self, magnitudes: torch.Tensor) -> None:
        """Pass 1: count the high bits of one chunk (T, ...)."""
        bits = _bits(magnitudes)
        self.n += bits.shape[1]
        idx = (bits >> 16) + self._offsets(HIGH_BINS)
        self._coarse += torch.bincount(idx.flatten(), minlength=self._coarse.numel())
        self._coarse_l1 += torch.bincount(
            idx.flatten(), weights=magnitudes.reshape(-1).double(), minlength=self._coarse.numel()
        )

    def end_coarse(self) -> None:
        """Find, per task, the high-bits bin that holds the k-th largest value."""
        if getattr(self, "_n_box", None) is not None:
            self.n, self._n_box = int(self._n_box.item()), None
        counts = self._coarse.view(self.num_tasks, HIGH_BINS)
        from_top = counts.flip(1).cumsum(1).flip(1)  # count of values in this bin or above
        k = kept_count(self.n, self.density)
        self.k = k
        # the bin holding the k-th largest: the highest bin with from_top >= k
        has = from_top >= k
        self._bin = (has.int() * torch.arange(HIGH_BINS, device=self.device)).amax(dim=1)
        above = from_top.gather(1, (self._bin + 1).clamp(max=HIGH_BINS - 1).unsqueeze(1)).squeeze(1)
        self._above = torch.where(self._bin + 1 < HIGH_BINS, above, torch.zeros_like(above))

    def partials(self, pass_index: int) -> list[torch.Tensor]:
        """The counts and sums of pass ``pass_index`` (0: coarse, 1: fine), to be summed across processes."""
        if pass_index == 0:
            self._n_box = torch.tensor([self.n], dtype=torch.int64, device=self.device)
            return [self._coarse, self._coarse_l1, self._n_box]
        return [self._fine, self._fine_l1]

    def observe_fine(self, magnitudes: torch.Tensor) -> None:
        """Pass 2: count the low bits of the values that fall in each task's chosen bin."""
        assert self._bin is not None, "end_coarse() first"
        bits = _bits(magnitudes)
        in_bin = (bits >> 16) == self._bin.unsqueeze(1)
        idx = ((bits & 0xFFFF) + self._offsets(LOW_BINS))[in_bin]
        self._fine += torch.bincount(idx, minlength=self._fine.numel())
        vals = magnitudes.reshape(self.num_tasks, -1)[in_bin].double()
        self._fine_l1 += torch.bincount(idx, weights=vals, minlength=self._fine.numel())

    def end_fine(self) -> None:
        """Exact thresholds, kept counts and the L1 mass below the threshold, per task."""
        fine = self._fine.view(self.num_tasks, LOW_BINS)
        from_top = fine.flip(1).cumsum(1).flip(1) + self._above.unsqueeze(1)
        has = from_top >= self.k
        low = (has.int() * torch.arange(LOW_BINS, device=self.device)).amax(dim=1)
        bits = ((self._bin << 16) | low).to(torch.int32)
        self.thresholds = bits.view(torch.float32)
        self.kept = from_top.gather(1, low.unsqueeze(1)).squeeze(1).tolist()
        coarse_l1 = self._coarse_l1.view(self.num_tasks, HIGH_BINS)
        fine_l1 = self._fine_l1.view(self.num_tasks, LOW_BINS)
        cols_h = torch.arange(HIGH_BINS, device=self.device)
        cols_l = torch.arange(LOW_BINS, device=self.device)
        below_coarse = torch.where(cols_h < self._bin.unsqueeze(1), coarse_l1, 0.0).sum(1)
        below_fine = torch.where(cols_l < low.unsqueeze(1), fine_l1, 0.0).sum(1)
        self.removed_l1 = (below_coarse + below_fine).tolist()
        self.total_l1 = coarse_l1.sum(1).tolist()


SELECT_BINS = 1 << 16
SELECT_CHUNK = 1 << 22  # values per task handled at once, so temporaries stay small on big tensors


def order_keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2³²) that order like the float32 ``values`` of any sign (−0.0 counts as +0.0)."""
    bits = (values.float() + 0.0).view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # + 0.0 turns −0.0 into +0.0
    return torch.where(bits >= 1 << 31, 0xFFFFFFFF - bits, bits + (1 << 31))


def key_values(keys: torch.Tensor) -> torch.Tensor:
    """The float32 values of ``order_keys`` keys (the inverse map)."""
    bits = torch.where(keys >= 1 << 31, keys - (1 << 31), 0xFFFFFFFF - keys)
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)


def column_chunks(n: int, size: int | None = None) -> list[slice]:
    """Slices covering range(n) in pieces of at most ``size`` (default SELECT_CHUNK)."""
    size = size or SELECT_CHUNK
    return [slice(i, min(n, i + size)) for i in range(0, n, size)] or [slice(0, 0)]


class StreamingSelect:
    """Exact k-th smallest values per task over a stream of (T, ...) chunks, in two passes.

    The same two-pass histogram scheme as StreamingTopK, for values of any sign and several
    ranks at once: pass 1 counts the high 16 bits of an order-preserving 32-bit key, pass 2 the
    low 16 bits of the values inside the bin that holds each wanted rank. ``ranks(n)`` gives the
    1-based ranks (the same for every task) once the count n per task is known; the result
    equals ``sorted(values)[k - 1]`` of the whole stream, ties included.
    """

    def __init__(self, num_tasks: int, ranks: Callable[[int], Sequence[int]],
                 device: torch.device | str = "cpu") -> None:
        self.num_tasks = num_tasks
        self.device = torch.device(device)
        self._ranks_of = ranks
        self.n = 0
        self._coarse = torch.zeros(num_tasks * SELECT_BINS, dtype=torch.int64, device=self.device)
        self._fine: torch.Tensor | None = None
        self._ranks: torch.Tensor | None = None  # (R,) int64
        self._bin: torch.Tensor | None = None  # (T, R) high 16 bits of each selected key
        self._below: torch.Tensor | None = None  # (T, R) count of values in lower bins
        self._n_box: torch.Tensor | None = None  # n as a tensor, while partials are being summed
        self.values: torch.Tensor | None = None  # (T, R) float32: the selected values
        self.at_or_below: torch.Tensor | None = None  # (T, R) int64: count of values <= each

    def _flat(self, values: torch.Tensor) -> torch.Tensor:
        return values.reshape(self.num_tasks, -1)

    def observe_coarse(self, values: torch.Tensor) -> None:
        """Pass 1: count the high key bits of one chunk (T, ...)."""
        flat = self._flat(values)
        self.n += flat.shape[1]
        offsets = (torch.arange(self.num_tasks, device=self.device) * SELECT_BINS).unsqueeze(1)
        for sl in column_chunks(flat.shape[1]):
            idx = (order_keys(flat[:, sl]) >> 16) + offsets
            self._coarse += torch.bincount(idx.flatten(), minlength=self._coarse.numel())

    def partials(self, pass_index: int) -> list[torch.Tensor]:
        """The counts of pass ``pass_index`` (0: coarse, 1: fine); summed in place across processes
        that each observed part of the stream, they give every process the whole stream's result."""
        if pass_index == 0:
            self._n_box = torch.tensor([self.n], dtype=torch.int64, device=self.device)
            return [self._coarse, self._n_box]
        assert self._fine is not None, "end_coarse() first"
        return [self._fine]

    def end_coarse(self) -> None:
        """Find, per task and rank, the high-bits bin that holds the ranked value."""
        if self._n_box is not None:  # the count summed across processes
            self.n, self._n_box = int(self._n_box.item()), None
        ranks = [int(k) for k in self._ranks_of(self.n)]
        if self.n and not all(1 <= k <= self.n for k in ranks):
            raise ValueError(f"ranks {ranks} outside 1..{self.n}")
        self._ranks = torch.tensor(ranks, dtype=torch.int64, device=self.device)
        counts = self._coarse.view(self.num_tasks, SELECT_BINS)
        cum = counts.cumsum(1)
        wanted = self._ranks.expand(self.num_tasks, -1).contiguous()
        self._bin = torch.searchsorted(cum, wanted).clamp(max=SELECT_BINS - 1)
        self._below = cum.gather(1, self._bin) - counts.gather(1, self._bin)
        self._fine = torch.zeros(self.num_tasks, len(ranks), SELECT_BINS, dtype=torch.int64, device=self.device)

    def observe_fine(self, values: torch.Tensor) -> None:
        """Pass 2: count the low key bits of the values inside each rank's bin."""
        assert self._bin is not None and self._fine is not None, "end_coarse() first"
        flat = self._flat(values)
        offsets = (torch.arange(self.num_tasks, device=self.device) * SELECT_BINS).unsqueeze(1)
        for sl in column_chunks(flat.shape[1]):
            keys = order_keys(flat[:, sl])
            high, low = keys >> 16, (keys & 0xFFFF) + offsets
            for r in range(self._bin.shape[1]):
                inside = high == self._bin[:, r:r + 1]
                counts = torch.bincount(low[inside], minlength=self.num_tasks * SELECT_BINS)
                self._fine[:, r] += counts.view(self.num_tasks, SELECT_BINS)

    def end_fine(self) -> None:
        """The exact selected values and the count of values at or below each."""
        assert self._bin is not None and self._fine is not None and self._ranks is not None
        if self.n == 0:
            self.values = torch.zeros(self._bin.shape, dtype=torch.float32, device=self.device)
            self.at_or_below = torch.zeros(self._bin.shape, dtype=torch.int64, device=self.device)
            return
        cum = self._fine.cumsum(2) + self._below.unsqueeze(2)
        wanted = self._ranks.expand(self.num_tasks, -1).unsqueeze(2).contiguous()
        low = torch.searchsorted(cum, wanted).squeeze(2)
        self.values = key_values((self._bin << 16) | low)
        self.at_or_below = cum.gather(2, low.unsqueeze(2)).squeeze(2)
