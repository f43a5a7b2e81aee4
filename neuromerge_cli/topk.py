"""Exact top-k magnitude thresholds: per tensor, and streamed over a whole model.

The streamed threshold never holds a task vector in memory. |τ| as float32 is non-negative, so
its bit pattern orders like the value. Pass 1 counts the high 16 bits (sign excluded: 32768
bins) and finds the bin holding the k-th largest value; pass 2 counts the low 16 bits of the
values in that bin, which pins the exact bit pattern of the k-th largest value.
"""

from __future__ import annotations

import math

import torch

HIGH_BINS = 1 << 15
LOW_BINS = 1 << 16


def kept_count(n: int, density: float) -> int:
    """k = max(1, ⌊d·N⌋), or N when d >= 1."""
    return n if density >= 1.0 else min(n, max(1, math.floor(density * n)))


SELECT_SAMPLE = 1 << 14  # entries of a row sampled to bracket its k-th value


def tensor_thresholds(magnitudes: torch.Tensor, density: float) -> torch.Tensor:
    """Per-row k-th largest value of ``magnitudes`` (T, ...) flattened per row: shape (T,)."""
    flat = magnitudes.reshape(magnitudes.shape[0], -1)
    n = flat.shape[1]
    k = kept_count(n, density)
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
