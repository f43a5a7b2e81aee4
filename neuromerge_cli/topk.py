"""Exact order statistics over a stream of tensors, in two passes of 16-bit histograms.

One scheme (HistogramSelect) over 32-bit integer keys that order like the values: pass 1 counts
the high 16 bits of every key and finds, per task, the bin that holds each wanted rank; pass 2
counts the low 16 bits of the keys inside that bin, which pins the exact key. Two users:
StreamingTopK (the k-th largest |x|: the key is the bit pattern of |x|, which orders like |x|) and
StreamingSelect (values of any sign: ``order_keys``; PCB's quantiles). Aimed by a sample (``aimed_bins``),
the first pass of either also counts a window of bins around each estimated rank, key by key, and often
finishes alone. Neither holds a task vector in memory.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable, Iterator, Sequence, Union

import torch

from . import kernels
from .sums import row_sums_f64, sum_and_capped_sum

KEY_BINS = 1 << 16  # histogram bins of each half of a 32-bit key
LOW_BINS = KEY_BINS  # values of the low 16 bits of |x| inside a threshold bin
WINDOW_BINS = 12  # the most coarse bins an aimed window spans (StreamingTopK.aim; 8 missed 2 of 30 samples of real weights)
WINDOW_SPREAD = 6.0  # standard errors of the sample's threshold rank an aimed window spans on either side
WINDOW_MARGIN = 0.002  # and at least this share of the entries


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
    n, k = flat.shape[1], kept_count(flat.shape[1], density)
    if 0 < k < n <= 4 * SELECT_SAMPLE:  # small rows: one batched select
        return torch.kthvalue(flat, n - k + 1, dim=1).values
    return torch.stack([row_threshold(row, density)[0] for row in flat]) if flat.shape[0] else flat.new_zeros(0)


class StoredMagnitudes:
    """|x − base| in float32 of one task's tensor as stored ([base, x] taken by kernels.applies), flattened,
    never made whole unless a step needs every value (``whole``): kth_smallest samples it and counts
    around its guesses, and the trim sums it, through the kernels, from the stored inputs."""

    def __init__(self, x: torch.Tensor, base: torch.Tensor) -> None:
        self.x, self.base = x.reshape(-1), base.reshape(-1)
        self._sums: tuple[float, float, float] | None = None  # (value, Σ, Σ capped at value) of the last count

    def numel(self) -> int:
        return self.x.numel()

    def sample(self, step: int) -> torch.Tensor:
        """Every ``step``-th value (the float32 values ``whole`` would hold)."""
        return (self.x[::step].float() - self.base[::step].float()).abs_()

    def whole(self) -> torch.Tensor:
        return kernels.abs_difference(self.x, self.base)

    def count_around(self, value: float) -> tuple[int, int]:
        """Counts around ``value``; its capped sums come in the same read (kth_smallest's last count is
        mostly at the threshold the trim then sums at)."""
        below, equal, total, capped = kernels.count_and_sums(self.x, value, self.base)
        self._sums = (value, total, capped)
        return below, equal

    def capped_sums(self, cap: float) -> tuple[float, float]:
        if self._sums is not None and self._sums[0] == cap:
            return self._sums[1], self._sums[2]
        return kernels.capped_sums(self.x, cap, self.base)


Row = Union[torch.Tensor, StoredMagnitudes]  # a 1-d row of magnitudes, made or read from the stored inputs


def whole(row: Row) -> torch.Tensor:
    """A row's values as a tensor."""
    return row.whole() if isinstance(row, StoredMagnitudes) else row


def row_threshold(row: Row, density: float) -> tuple[torch.Tensor, int]:
    """The k-th largest entry of a 1-d ``row`` (0 when it is empty) and how many entries are below it."""
    n = row.numel()
    k = kept_count(n, density)
    if n == 0:  # an empty tensor: nothing to keep or trim
        return whole(row).new_zeros(()), 0
    if k >= n:
        return whole(row).amin(), 0
    return kth_smallest(row, n - k + 1)


GUESSES = 3  # guesses of kth_smallest checked by counting before it brackets the answer


def kth_smallest(row: Row, q: int) -> tuple[torch.Tensor, int]:
    """The exact q-th smallest entry (1-based) of a 1-d tensor and how many entries are below it, in a
    few passes instead of a full select (NaN counts as the largest value, as in ``torch.kthvalue``).

    A strided sample gives a guess, which counting the entries below and at it confirms or refutes.
    Task vectors of bfloat16 checkpoints repeat each magnitude hundreds of times, so a guess is often
    the answer; when it is not, the counts say how many entries it is off by, and the next guess is
    the sample entry that far away (up to GUESSES in all: in a 0.47B benchmark one in six first
    guesses missed, and every second one hit). Then the sample brackets the answer on the side the
    last counts point to, and it is selected among the few entries inside the bracket (checked: if
    the bracket misses, a full select).
    """
    n = row.numel()
    if n <= 4 * SELECT_SAMPLE:
        row = whole(row)
        value = torch.kthvalue(row, q).values
        return value, count_around(row, value)[0]
    step = max(1, n // SELECT_SAMPLE)
    sample = sorted_values(row.sample(step) if isinstance(row, StoredMagnitudes) else row[::step])
    m = sample.numel()
    frac = q / n
    at = min(m - 1, int(frac * m))
    margin = int(4.0 * math.sqrt(m * frac * (1.0 - frac))) + 16
    low: tuple[torch.Tensor, int] | None = None  # a guess below the answer, and the entries up to it
    high: torch.Tensor | None = None  # a guess above the answer
    for _ in range(GUESSES):
        guess = sample[at]
        below, equal = count_around(row, guess)
        if below < q:
            up_to = below + equal
            if q <= up_to:
                return guess, below
            low = (guess, up_to)
            # the answer is above: the sample entry the missing entries away, past every copy of the guess
            nxt = max(int(torch.searchsorted(sample, guess, right=True)), at + round((q - up_to) * m / n))
        else:
            high = guess
            # the answer is below: as far down, before every copy of the guess
            nxt = min(int(torch.searchsorted(sample, guess)) - 1, at - round((below - q + 1) * m / n))
        if not 0 <= nxt < m:
            break
        at = nxt
    # bracket: above the guess below the answer (else from the sample, the margin down), below the one
    # above it (else the margin up)
    row = whole(row)
    if low is not None:
        under, in_low = low[1], row > low[0]
    else:
        lo = sample[max(0, at - margin)]
        under, in_low = int(torch.count_nonzero(row < lo)), row >= lo
    inside = row[in_low & ((row < high) if high is not None else (row <= sample[min(m - 1, at + margin)]))]
    if under < q <= under + inside.numel():
        value = torch.kthvalue(inside, q - under).values
        return value, under + int(torch.count_nonzero(inside < value))
    value = torch.kthvalue(row, q).values
    return value, count_around(row, value)[0]


def sorted_values(x: torch.Tensor) -> torch.Tensor:
    """A 1-d tensor's values in ascending order, NaN last. On a CPU numpy sorts them: it makes no
    indices and its sort is vectorised (16K float32: 0.08 ms against torch's 0.99 ms)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        import numpy as np

        return torch.from_numpy(np.sort(x.numpy()))
    return x.sort().values


def sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows of a 2-d CPU tensor (float32, NaN last, or integer keys), each in ascending order (numpy's sort,
    as sorted_values)."""
    import numpy as np

    return torch.from_numpy(np.sort(x.numpy(), axis=1))


def count_around(row: Row, value: torch.Tensor) -> tuple[int, int]:
    """(entries of ``row`` below ``value``, entries equal to it): one sweep of the fused kernel
    (kernels.count_around) where it applies."""
    if isinstance(row, StoredMagnitudes):
        return row.count_around(float(value))
    if kernels.takes(row):
        return kernels.count_around(row, float(value))
    return int(torch.count_nonzero(row < value)), int(torch.count_nonzero(row == value))


def capped_sums(row: Row, cap: torch.Tensor) -> tuple[float, float]:
    """(Σ row, Σ min(row, cap)) in float64 (sums.sum_and_capped_sum; from the stored inputs by the kernels,
    or from the count that found ``cap``, for StoredMagnitudes)."""
    if isinstance(row, StoredMagnitudes):
        return row.capped_sums(float(cap))
    return sum_and_capped_sum(row, cap)


class HistogramSelect:
    """Exact ranked keys per task over a stream of (T, n) chunks of 32-bit keys, in two passes.

    Keys are non-negative integers below 2³², handed over as their high and low 16-bit halves.
    ``ranks(n)`` gives the 1-based ranks (ascending, the same for every task) once the count n
    per task is known. After ``end_fine``: ``keys`` (T, R) equals ``sorted(keys)[rank - 1]`` of
    the whole stream, ties included; ``at_or_below`` and ``below`` count the keys <= and < it.
    Between the passes ``bins`` (T, R) holds the high half of each selected key.
    """

    def __init__(self, num_tasks: int, ranks: Callable[[int], Sequence[int]],
                 device: torch.device | str = "cpu") -> None:
        self.num_tasks = num_tasks
        self.device = torch.device(device)
        self._ranks_of = ranks
        self.n = 0
        # (T, 1) int32: task t's histogram starts at t · KEY_BINS of the flat counts
        self.offsets = (torch.arange(num_tasks, dtype=torch.int32, device=self.device) * KEY_BINS).unsqueeze(1)
        self._coarse = torch.zeros(num_tasks * KEY_BINS, dtype=torch.int64, device=self.device)
        self._fine: torch.Tensor | None = None  # (T, R, KEY_BINS) counts of low halves
        self._ranks: torch.Tensor | None = None  # (R,) int64
        self.bins: torch.Tensor | None = None  # (T, R) high half of each selected key
        self._under: torch.Tensor | None = None  # (T, R) count of keys in lower bins
        self._n_box: torch.Tensor | None = None  # n as a tensor, while partials are being summed
        self.keys: torch.Tensor | None = None  # (T, R) int64: the selected keys
        self.at_or_below: torch.Tensor | None = None  # (T, R) int64: count of keys <= each
        self.below: torch.Tensor | None = None  # (T, R) int64: count of keys < each

    def _count(self, halves: torch.Tensor) -> torch.Tensor:
        """Per-task counts (T·KEY_BINS,) of 16-bit ``halves`` (T, n), in one bincount."""
        return torch.bincount((halves + self.offsets).reshape(-1), minlength=self.num_tasks * KEY_BINS)

    def observe_coarse(self, high: torch.Tensor) -> None:
        """Pass 1: count the high halves (T, n) of one chunk's keys."""
        self.n += high.shape[1]
        self._coarse += self._count(high)

    @property
    def coarse_counts(self) -> torch.Tensor:
        """Pass 1's counts of high halves, flat (T · KEY_BINS), for a caller that counts them itself
        (adding the count of keys to ``n``)."""
        return self._coarse

    def partials(self, pass_index: int) -> list[torch.Tensor]:
        """The counts of pass ``pass_index`` (0: coarse, 1: fine); summed in place across processes
        that each observed part of the stream, they give every process the whole stream's result."""
        if pass_index == 0:
            self._n_box = torch.tensor([self.n], dtype=torch.int64, device=self.device)
            return [self._coarse, self._n_box]
        assert self._fine is not None, "end_coarse() first"
        return [self._fine]

    def end_coarse(self) -> None:
        """Find, per task and rank, the high-half bin that holds the ranked key."""
        if self._n_box is not None:  # the count summed across processes
            self.n, self._n_box = int(self._n_box.item()), None
        ranks = [int(k) for k in self._ranks_of(self.n)]
        if self.n and not all(1 <= k <= self.n for k in ranks):
            raise ValueError(f"ranks {ranks} outside 1..{self.n}")
        self._ranks = torch.tensor(ranks, dtype=torch.int64, device=self.device)
        counts = self._coarse.view(self.num_tasks, KEY_BINS)
        cum = counts.cumsum(1)
        wanted = self._ranks.expand(self.num_tasks, -1).contiguous()
        self.bins = torch.searchsorted(cum, wanted).clamp(max=KEY_BINS - 1)
        self._under = cum.gather(1, self.bins) - counts.gather(1, self.bins)
        self._fine = torch.zeros(self.num_tasks, len(ranks), KEY_BINS, dtype=torch.int64, device=self.device)

    @property
    def fine_counts(self) -> torch.Tensor:
        """(T, R, KEY_BINS) counts of the low halves inside each rank's bin (after pass 2)."""
        assert self._fine is not None, "end_coarse() first"
        return self._fine

    def end_fine(self) -> None:
        """The exact selected keys and the counts of keys at or below, and below, each."""
        assert self.bins is not None and self._fine is not None and self._ranks is not None
        if self.n == 0:
            self.keys = torch.zeros(self.bins.shape, dtype=torch.int64, device=self.device)
            self.at_or_below = torch.zeros_like(self.keys)
            self.below = torch.zeros_like(self.keys)
            return
        cum = self._fine.cumsum(2) + self._under.unsqueeze(2)
        wanted = self._ranks.expand(self.num_tasks, -1).unsqueeze(2).contiguous()
        low = torch.searchsorted(cum, wanted)
        self.keys = ((self.bins << 16) | low.squeeze(2)).to(torch.int64)
        self.at_or_below = cum.gather(2, low).squeeze(2)
        self.below = self.at_or_below - self._fine.gather(2, low).squeeze(2)


def magnitude_bits(values: torch.Tensor) -> torch.Tensor:
    """Bit patterns of |x| (T, n) as int32 for float32 ``values`` (T, ...) of any sign: they order like |x|."""
    return values.float().contiguous().view(torch.int32).reshape(values.shape[0], -1) & 0x7FFFFFFF


def count_window(keys: torch.Tensor, window: kernels.Window) -> torch.Tensor:
    """Add to ``window.fine`` the counts of the integer ``keys`` (T, n) inside it (torch; the kernels' order_window).
    Returns the keys' offsets from the window's starts (negative below it), in the keys' dtype (int32 keys, as the
    bits of |x|, are below 2^31: so are their offsets and T · width)."""
    offset = keys - window.starts.to(keys.dtype).unsqueeze(1)
    inside = (offset >= 0) & (offset < window.width)
    slots = offset + (torch.arange(len(window.starts), device=keys.device, dtype=keys.dtype) * window.width).unsqueeze(1)
    slots = slots[inside].long()
    # the few keys inside added one by one: a bincount of the whole window (up to 12 · 2^16 counts a task) per chunk
    # cost more than the chunk's keys
    window.fine.view(-1).index_add_(0, slots, torch.ones_like(slots))
    return offset


def count_magnitudes(bits: torch.Tensor, window: kernels.Window) -> None:
    """count_window of the bit patterns ``bits`` (T, n) of |x|, and the L1 of those below it into ``window.below``
    (torch; the kernels' magnitude_window)."""
    under = count_window(bits, window) < 0
    window.below.add_(row_sums_f64(torch.where(under, bits, 0).view(torch.float32)))


def empty_window(starts: torch.Tensor, width: int, device: torch.device) -> kernels.Window:
    """A window of ``width`` keys from each task's key ``starts`` (T,), its counts and sums at 0, on ``device``."""
    return kernels.Window(starts.to(device).contiguous(), width,
                          torch.zeros(len(starts) * width, dtype=torch.int64, device=device),
                          torch.zeros(len(starts), dtype=torch.float64, device=device))


def bin_offsets(window: kernels.Window, bins: torch.Tensor) -> torch.Tensor | None:
    """Where each task's coarse bin ``bins`` (T,) lies among the window's whole bins (T,), or None where one
    lies outside them (an aimed pass that missed)."""
    offset = bins.long() - (window.starts >> 16)
    return offset if bool(((offset >= 0) & (offset < window.width // KEY_BINS)).all()) else None


def bin_counts(window: kernels.Window, offset: torch.Tensor) -> torch.Tensor:
    """The window's counts (T, KEY_BINS) of each task's bin at ``offset`` (bin_offsets): pass 2's counts."""
    counts = window.fine.view(len(offset), window.width // KEY_BINS, KEY_BINS)
    return counts[torch.arange(len(offset), device=counts.device), offset]


def aimed_bins(keys: torch.Tensor, sizes: list[int], share: float) -> tuple[torch.Tensor, int]:
    """Where an aimed first pass counts each task's keys one by one: (first bin (T,) int64, number of bins) of
    a window of whole coarse bins around the ``share`` quantile of each row of a sample's integer ``keys``
    (T, m), made of blocks of ``sizes`` entries along a row (the sampling units). It spans the sample's ranks
    within WINDOW_SPREAD standard errors (at least WINDOW_MARGIN) of the estimate's, and a bin either side, up to
    WINDOW_BINS bins."""
    ordered = sorted_rows(keys)
    m = keys.shape[1]
    estimate = ordered[:, min(m - 1, int(share * m))].long()
    # the blocks' counts below the estimate against their sizes: a ratio estimator's standard error
    low = keys < estimate.to(keys.dtype).unsqueeze(1)
    below = torch.stack([part.sum(1) for part in low.split(sizes, 1)], 1).double()
    units = torch.tensor(sizes, dtype=torch.float64)
    error = ((below - below.sum(1, keepdim=True) / m * units) ** 2).sum(1).sqrt() / m
    margin = (WINDOW_SPREAD * error).clamp(min=WINDOW_MARGIN)

    def bin_at(shares: torch.Tensor) -> torch.Tensor:
        return ordered.gather(1, (shares * m).long().clamp(0, m - 1).unsqueeze(1)).squeeze(1).long() >> 16

    centre = estimate >> 16
    first = torch.minimum(bin_at(share - margin), centre - 1).clamp(min=0)
    last = torch.maximum(bin_at(share + margin), centre + 1).clamp(max=KEY_BINS - 1)
    bins = min(WINDOW_BINS, int((last - first + 1).max()))
    first = torch.where(last - first + 1 > bins, centre - bins // 2, first).clamp(0, KEY_BINS - bins)
    return first, bins


class StreamingTopK:
    """Exact k-th largest |x| per task over a stream of (T, ...) chunks, two passes, with the L1
    mass that a top-k trim at that threshold removes.

    Chunks may hold signed values or magnitudes: |x| is read from the bits (sign bit cleared).
    """

    def __init__(self, num_tasks: int, density: float, device: torch.device | str = "cpu") -> None:
        self.num_tasks = num_tasks
        self.density = density
        self.device = torch.device(device)
        self.k = 0
        self._select = HistogramSelect(num_tasks, self._rank, device)
        self._total_l1 = torch.zeros(num_tasks, dtype=torch.float64, device=self.device)
        self._below_l1 = torch.zeros(num_tasks, dtype=torch.float64, device=self.device)  # in lower bins
        self.thresholds: torch.Tensor | None = None
        self.kept: list[int] = []
        self.removed_l1: list[float] = []
        self.total_l1: list[float] = []
        self.window: kernels.Window | None = None  # whole bins counted bit pattern by bit pattern in pass 1 (aim)
        self.resolved = False  # pass 1 found the thresholds (its window held their bins): no pass 2
        self._bin_window: kernels.Window | None = None  # pass 2's counts: each task's threshold bin
        self._spare: kernels.SpareCounts | None = None  # the kernels' other threads' counts in this pass

    def _rank(self, n: int) -> list[int]:
        self.k = kept_count(n, self.density)
        return [n - self.k + 1]  # the k-th largest is the (n − k + 1)-th smallest

    @property
    def n(self) -> int:
        return self._select.n

    @property
    def bins(self) -> torch.Tensor:
        """(T,) the high 16 bits of each task's threshold (after pass 1)."""
        assert self._select.bins is not None, "end_coarse() first"
        return self._select.bins[:, 0]

    def aim(self, blocks: list[torch.Tensor]) -> None:
        """Before pass 1, from a sample of the values in blocks (T, m_b) of any sign (the sampling units, e.g.
        blocks of rows spread over the stream): a window of whole coarse bins around each task's estimated
        threshold (aimed_bins), counted bit pattern by bit pattern in pass 1, which then finds every threshold
        whose bin the window holds (``resolved``; else pass 2 does)."""
        blocks = [b.reshape(b.shape[0], -1) for b in blocks]
        sizes = [b.shape[1] for b in blocks if b.shape[1]]
        if not sizes or self.density >= 1.0:
            return
        first, bins = aimed_bins(magnitude_bits(torch.cat(blocks, 1)), sizes, 1.0 - self.density)
        self.window = empty_window(first << 16, bins * KEY_BINS, self.device)

    def observe_coarse(self, values: torch.Tensor) -> None:
        """Pass 1: count the high bits of |x| of one chunk (T, ...) and add up its L1 norms (and count the
        window, when aimed)."""
        rows = values.reshape(values.shape[0], -1)
        if kernels.takes(rows) and self.device.type == "cpu":  # one sweep, no int32 copy of the bits
            self._select.n += rows.shape[1]
            kernels.magnitude_histogram(list(rows), self._select.coarse_counts, self._total_l1, None, self.window,
                                        self._spare_counts(0))
            return
        bits = magnitude_bits(values)
        self._select.observe_coarse(bits >> 16)
        self._total_l1 += row_sums_f64(bits.view(torch.float32))
        if self.window is not None:
            count_magnitudes(bits, self.window)

    def end_coarse(self) -> None:
        """Find, per task, the high-bits bin that holds the k-th largest value; with an aimed window that
        holds every task's bin, the exact thresholds too (``resolved``)."""
        self._flush()
        self._spare = None
        self._select.end_coarse()
        window, self.window = self.window, None
        offset = None if window is None or self.n == 0 else bin_offsets(window, self.bins)
        if window is None or offset is None:  # pass 2 counts each task's threshold bin
            self._bin_window = kernels.Window(self.bins.long().contiguous() << 16, KEY_BINS,
                                              self._select.fine_counts[:, 0], self._below_l1)
            return
        self._select.fine_counts[:, 0] = bin_counts(window, offset)
        # the L1 below the threshold's bin: below the window, and in its bins before that one (count × value), a
        # task at a time (the whole window's keys and products at once took 5 tables of its size)
        counts = window.fine.view(self.num_tasks, -1)
        self._below_l1 = window.below.clone()
        for t, before in enumerate((offset * KEY_BINS).tolist()):
            keys = window.starts[t] + torch.arange(before, device=counts.device)
            self._below_l1[t] += (counts[t, :before] * keys.to(torch.int32).view(torch.float32).double()).sum()
        self.end_fine()
        self.resolved = True

    def partials(self, pass_index: int) -> list[torch.Tensor]:
        """The counts and sums of pass ``pass_index`` (0: coarse, with the window's; 1: fine), to be summed
        across processes."""
        self._flush()
        if pass_index == 0:
            aimed = [] if self.window is None else [self.window.fine, self.window.below]
            return [*self._select.partials(0), self._total_l1, *aimed]
        return [*self._select.partials(1), self._below_l1]

    def observe_fine(self, values: torch.Tensor) -> None:
        """Pass 2: count the low bits of |x| inside each task's threshold bin and add up the L1
        of the values below that bin."""
        rows = values.reshape(values.shape[0], -1)
        assert self._bin_window is not None
        if kernels.takes(rows) and self.device.type == "cpu":
            kernels.magnitude_window(list(rows), self._bin_window, None, self._spare_counts(1))
        else:
            count_magnitudes(magnitude_bits(values), self._bin_window)

    def observe_stored(self, pass_index: int, tensors: list[torch.Tensor]) -> torch.Tensor | None:
        """Pass ``pass_index`` (0: coarse, 1: fine) over one chunk given as the stored inputs [θ0, θ_1..θ_T]
        (kernels.applies must hold), |τ_t| = |θ_t − θ0| made on the fly by the kernels: the same counts as
        observe_* of the float32 task vectors. Returns the chunk's Σ|τ_t| in pass 0 (else None)."""
        base, rows = tensors[0].reshape(-1), [t.reshape(-1) for t in tensors[1:]]
        if pass_index == 0:
            self._select.n += base.numel()
            sums = torch.zeros(len(rows), dtype=torch.float64)
            kernels.magnitude_histogram(rows, self._select.coarse_counts, sums, base, self.window,
                                        self._spare_counts(0))
            self._total_l1 += sums
            return sums
        assert self._bin_window is not None
        kernels.magnitude_window(rows, self._bin_window, base, self._spare_counts(1))
        return None

    def _spare_counts(self, pass_index: int) -> kernels.SpareCounts:
        """The kernels' spare counts for this pass's counts, made at its first sweep."""
        if self._spare is None:
            self._spare = (kernels.SpareCounts(self._select.coarse_counts, self.window) if pass_index == 0
                           else kernels.SpareCounts(None, self._bin_window))
        return self._spare

    def _flush(self) -> None:
        """The spare counts into the pass's counts, before they are read (or summed across processes)."""
        if self._spare is not None:
            self._spare.flush()

    def end_fine(self) -> None:
        """Exact thresholds, kept counts and the L1 mass below the threshold, per task."""
        self._flush()
        self._spare = self._bin_window = None
        sel = self._select
        sel.end_fine()
        assert sel.keys is not None and sel.below is not None
        keys = sel.keys[:, 0]
        self.thresholds = keys.to(torch.int32).view(torch.float32)
        self.kept = (self.n - sel.below[:, 0]).tolist()
        # every in-bin value is fixed by its low bits: L1 below the threshold = Σ count × value
        low = torch.arange(LOW_BINS, device=self.device, dtype=torch.int32)
        in_bin = ((self.bins.to(torch.int32).unsqueeze(1) << 16) | low).view(torch.float32).double()
        counts = sel.fine_counts[:, 0]
        below_fine = torch.where(low < (keys & 0xFFFF).unsqueeze(1), counts * in_bin, 0.0).sum(1)
        self.removed_l1 = (self._below_l1 + below_fine).tolist()
        self.total_l1 = self._total_l1.tolist()


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
    """Exact k-th smallest values of any sign per task over a stream of (T, ...) chunks, two passes.

    HistogramSelect over ``order_keys``; ``ranks(n)`` gives the 1-based ranks (the same for every
    task) once the count n per task is known; the result equals ``sorted(values)[k - 1]`` of the
    whole stream, ties included. Contiguous float32 CPU chunks are counted by the kernels
    (kernels.order_histogram; pass 2: a window of each rank's bin per task), others by torch.
    Aimed by a sample (``aim``), pass 1 also counts a window around each rank's estimate and often
    finishes alone (``resolved``), as StreamingTopK's.
    """

    def __init__(self, num_tasks: int, ranks: Callable[[int], Sequence[int]],
                 device: torch.device | str = "cpu") -> None:
        self.num_tasks = num_tasks
        self._ranks_of = ranks
        self._select = HistogramSelect(num_tasks, ranks, device)
        self._windows: list[kernels.Window] = []  # per rank: the aimed window of pass 1, or each bin in pass 2
        self._spares: list[kernels.SpareCounts] = []  # the kernels' other threads' counts in this pass
        self.resolved = False  # pass 1's aimed windows held every ranked value's bin: no pass 2
        self.values: torch.Tensor | None = None  # (T, R) float32: the selected values
        self.at_or_below: torch.Tensor | None = None  # (T, R) int64: count of values <= each

    @property
    def n(self) -> int:
        return self._select.n

    def _keys(self, values: torch.Tensor) -> Iterator[torch.Tensor]:
        flat = values.reshape(self.num_tasks, -1)
        for sl in column_chunks(flat.shape[1]):  # 4M columns: large enough on a GPU too (keys are int64)
            yield order_keys(flat[:, sl])

    def _kernel_rows(self, values: torch.Tensor) -> list[torch.Tensor] | None:
        """The chunk's rows where the kernels count them, else None."""
        flat = values.reshape(self.num_tasks, -1)
        return list(flat) if kernels.takes(flat) and self._select.device.type == "cpu" else None

    def aim(self, blocks: list[torch.Tensor]) -> None:
        """Before pass 1, from a sample of the values in blocks (T, m_b) (the sampling units): per rank, a window
        of whole coarse bins around the entry of each task's sample at the same rank among its m entries
        (``ranks(m)``; aimed_bins), counted key by key in pass 1."""
        blocks = [b.reshape(b.shape[0], -1) for b in blocks]
        sizes = [b.shape[1] for b in blocks if b.shape[1]]
        if not sizes:
            return
        keys = order_keys(torch.cat(blocks, 1))
        device = self._select.device
        m = keys.shape[1]
        for rank in self._ranks_of(m):
            first, bins = aimed_bins(keys, sizes, (rank - 0.5) / m)  # the sample's (rank − 1)-th entry, from 0
            self._windows.append(empty_window(first << 16, bins * KEY_BINS, device))

    def _sweep(self, pass_index: int, rows: list[torch.Tensor], base: torch.Tensor | None = None) -> None:
        """The kernels' counts of one chunk (rows of values, or with a ``base`` stored inputs whose |τ_t| are
        the values): pass 1 the coarse counts beside the first window, the other windows in sweeps of their
        own; pass 2 each rank's bin."""
        if pass_index == 0:
            first, others = (self._windows[0], self._windows[1:]) if self._windows else (None, [])
            if not self._spares:
                self._spares = [kernels.SpareCounts(self._select.coarse_counts, first),
                                *(kernels.SpareCounts(None, w) for w in others)]
            self._select.n += rows[0].numel()
            kernels.order_histogram(rows, self._select.coarse_counts, first, self._spares[0], base)
            pairs = zip(others, self._spares[1:])
        else:
            if not self._spares:
                self._spares = [kernels.SpareCounts(None, w) for w in self._windows]
            pairs = zip(self._windows, self._spares)
        for window, spare in pairs:
            kernels.order_window(rows, window, spare, base)

    def observe_stored(self, pass_index: int, tensors: list[torch.Tensor]) -> None:
        """Pass ``pass_index`` (0: coarse, 1: fine) of the magnitudes |τ_t| = |θ_t − θ0| of one chunk given as the
        stored inputs [θ0, θ_1..θ_T] (kernels.applies must hold), made on the fly by the kernels."""
        self._sweep(pass_index, [t.reshape(-1) for t in tensors[1:]], tensors[0].reshape(-1))

    def observe_coarse(self, values: torch.Tensor) -> None:
        """Pass 1: count the high key bits of one chunk (T, ...) (and the aimed windows' keys)."""
        rows = self._kernel_rows(values)
        if rows is not None:
            self._sweep(0, rows)
            return
        for keys in self._keys(values):
            self._select.observe_coarse(keys >> 16)
            for window in self._windows:
                count_window(keys, window)

    def partials(self, pass_index: int) -> list[torch.Tensor]:
        """The counts of pass ``pass_index`` (see HistogramSelect.partials), with the kernels' or aimed windows'."""
        self._flush()
        return [*(self._select.partials(0) if pass_index == 0 else ()), *(w.fine for w in self._windows)]

    def _flush(self) -> None:
        for spare in self._spares:
            spare.flush()

    def end_coarse(self) -> None:
        """Find, per task and rank, the high-bits bin that holds the ranked value; where aimed windows hold
        every one of them, the exact values too (``resolved``)."""
        self._flush()
        self._select.end_coarse()
        bins = self._select.bins
        assert bins is not None
        aimed, self._windows, self._spares = self._windows, [], []
        offsets = [bin_offsets(window, bins[:, r]) for r, window in enumerate(aimed)]
        if aimed and all(offset is not None for offset in offsets):
            for r, (offset, window) in enumerate(zip(offsets, aimed)):
                self._select.fine_counts[:, r] = bin_counts(window, offset)
            self.end_fine()
            self.resolved = True
            return
        self._windows = [empty_window(bins[:, r].long() << 16, KEY_BINS, bins.device) for r in range(bins.shape[1])]

    def observe_fine(self, values: torch.Tensor) -> None:
        """Pass 2: count the low key bits of the values inside each rank's bin."""
        rows = self._kernel_rows(values)
        if rows is not None:
            self._sweep(1, rows)
            return
        for keys in self._keys(values):
            for window in self._windows:
                count_window(keys, window)

    def end_fine(self) -> None:
        """The exact selected values and the count of values at or below each."""
        self._flush()
        for r, window in enumerate(self._windows):
            self._select.fine_counts[:, r] = window.fine.view(self.num_tasks, KEY_BINS)
        self._windows, self._spares = [], []
        self._select.end_fine()
        assert self._select.keys is not None
        empty = self._select.n == 0  # no value: 0.0 (key 0 would decode to NaN)
        self.values = torch.zeros_like(self._select.keys, dtype=torch.float32) if empty else key_values(self._select.keys)
        self.at_or_below = self._select.at_or_below
