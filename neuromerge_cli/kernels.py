"""Fused CPU kernels (the C extension ``_kernels``) for the engine's hottest sweeps, where they apply.

A kernel does in one read of its inputs what takes several eager torch passes, with the same float32
operations in the same order: the same task vectors, merged weights and counts, bit for bit (float64
sums differ in their last digits: another summation order; NeuroMerging's float64 Gram matrices and
orthogonal sums too, which could move a float32 result by one unit in the last place, though no
benchmark or test output differs). DARE's masks are numpy's PCG64 draws. Callers keep the torch operations for
what a kernel does not take (CUDA, float64, non-contiguous views), for installs where the
extension could not be built and on x86-64 CPUs without x86-64-v3 (AVX2, FMA), for which it is not
compiled. NEUROMERGE_KERNELS=0 turns the kernels off, e.g. to compare the paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

try:
    from . import _kernels
except ImportError:  # built without a C compiler: the torch operations do the work
    _kernels = None


def _off_because() -> str | None:
    """Why the torch operations do the CPU sweeps, or None where the kernels do."""
    if _kernels is None:
        return "the C kernels are not built (no C compiler at install; reinstalled with one, CPU merges run 2-5x faster)"
    if not _kernels.FULL_SPEED:  # compiled for x86-64-v3 (generic x86-64 code is slower than torch)
        return "this CPU has no AVX2/FMA (x86-64-v3), which the C kernels need to beat torch"
    if os.environ.get("NEUROMERGE_KERNELS", "1") == "0":
        return "as NEUROMERGE_KERNELS=0 asks"
    return None


ENABLED = _off_because() is None
# storage dtypes the kernels read and write
KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
MAX_TASKS = 256  # _kernels.c's MAX_TASKS


def cpu_sweeps() -> str:
    """What does a merge's sweeps on a CPU, in words (the report and the dry run say it)."""
    if ENABLED:
        return "C kernels"
    return f"torch operations: {_off_because() or 'the C kernels are switched off'}"


def float16_instructions(on: bool) -> bool:
    """Convert float16 with F16C instructions (``on``: the default of the kernels compiled for x86-64-v3)
    or with integer operations (as kernels compiled for other CPUs do): the same values, but for the payload
    of a NaN. Returns whether F16C is used now. For comparing the two; never while a kernel runs."""
    return _kernels is not None and bool(_kernels.FULL_SPEED) and _kernels.float16_instructions(on)


def threads() -> int:
    """Threads a kernel may split its work over: torch's intra-op threads (``torch.set_num_threads``)."""
    return torch.get_num_threads()


def applies(tensors: list[torch.Tensor], device: torch.device) -> bool:
    """Whether the kernels take [θ0, θ_1..θ_T] as stored, for float32 results on ``device``."""
    first = tensors[0]
    return (ENABLED and device.type == "cpu" and first.dtype in KINDS and len(tensors) <= MAX_TASKS + 1
            and all(t.device.type == "cpu" and t.dtype == first.dtype and t.shape == first.shape
                    and t.is_contiguous() for t in tensors))


def takes(x: torch.Tensor) -> bool:
    """Whether the kernels over float32 values (count_around, capped_sums, magnitude_*) take ``x``:
    float32, contiguous, on the CPU."""
    return ENABLED and x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()


def count_around(x: torch.Tensor, value: float, base: torch.Tensor | None = None) -> tuple[int, int]:
    """(entries below ``value``, entries equal to it) of ``x`` (``takes`` must hold), or with a ``base`` of
    |x − base| in float32 (stored inputs [base, x] that ``applies`` takes), in one read."""
    below, equal, _, _ = _scan(x, value, base, 1)
    return below, equal


def capped_sums(x: torch.Tensor, cap: float, base: torch.Tensor | None = None) -> tuple[float, float]:
    """(Σ v, Σ min(v, cap)) in float64 of the values v of ``x``, or of |x − base| (as count_around), in one read."""
    _, _, total, capped = _scan(x, cap, base, 2)
    return total, capped


def count_and_sums(x: torch.Tensor, value: float, base: torch.Tensor | None = None) -> tuple[int, int, float, float]:
    """count_around and capped_sums at ``value`` together, in one read."""
    return _scan(x, value, base, 3)


def _scan(x: torch.Tensor, value: float, base: torch.Tensor | None, what: int) -> tuple[int, int, float, float]:
    assert _kernels is not None and (base is None or base.numel() == x.numel())
    return _kernels.scan(KINDS[x.dtype], 0 if base is None else base.data_ptr(), x.data_ptr(), x.numel(), value,
                         what, threads())


class Window(NamedTuple):
    """Consecutive float32 bit patterns of |τ_t| counted one by one: [starts[t], starts[t] + width) per task
    (``starts`` T int64), their counts in ``fine`` (T · width int64), Σ|τ_t| of the entries below in ``below``
    (T float64)."""

    starts: torch.Tensor
    width: int
    fine: torch.Tensor
    below: torch.Tensor


def magnitude_histogram(rows: list[torch.Tensor], counts: torch.Tensor, l1: torch.Tensor,
                        base: torch.Tensor | None = None, window: Window | None = None,
                        spare: SpareCounts | None = None) -> None:
    """For each task's magnitudes |τ_t| (|row_t − base| in float32 when ``base`` is given, else |row_t|): add to
    ``counts`` (T · 2^16 int64) the count of each value of the high 16 bits of their float32 bits
    (topk.magnitude_bits >> 16), and Σ|τ_t| to ``l1`` (T float64); with a ``window``, count it too in the same
    sweep (magnitude_window). One read: the rows are float32 (``takes`` holds for each) or, with a ``base``, stored
    inputs [base, *rows] that ``applies`` takes; every accumulator contiguous on the CPU. With ``spare`` (made for
    these counts and window) the sweep runs on threads() threads, and the counts are complete once it is flushed."""
    assert counts.dtype == torch.int64 and counts.is_contiguous() and counts.numel() == len(rows) << 16
    assert l1.dtype == torch.float64 and l1.is_contiguous()
    assert spare is None or (spare.coarse is counts and spare.window is window)
    _counts(rows, base, counts, l1, window, spare)


def magnitude_window(rows: list[torch.Tensor], window: Window, base: torch.Tensor | None = None,
                     spare: SpareCounts | None = None) -> None:
    """For each task's magnitudes |τ_t| (as magnitude_histogram) with float32 bits u: where u is inside the
    window, add one to ``window.fine`` at t · width + u − starts[t]; where it is below, add |τ_t| to
    ``window.below``. One read, inputs and ``spare`` as for magnitude_histogram."""
    assert spare is None or (spare.coarse is None and spare.window is window)
    _counts(rows, base, None, None, window, spare)


def order_histogram(rows: list[torch.Tensor], counts: torch.Tensor, window: Window | None = None,
                    spare: SpareCounts | None = None, base: torch.Tensor | None = None) -> None:
    """magnitude_histogram with topk.order_keys for keys, not the bits of |x|: of the values themselves, of any
    sign (float32 rows: ``takes`` holds for each), or with a ``base`` of |row_t − base| (stored inputs that
    ``applies`` takes); no sums (a window's ``below`` stays as it is)."""
    assert counts.dtype == torch.int64 and counts.is_contiguous() and counts.numel() == len(rows) << 16
    assert spare is None or (spare.coarse is counts and spare.window is window)
    _counts(rows, base, counts, torch.zeros(len(rows), dtype=torch.float64), window, spare, order=True)


def order_window(rows: list[torch.Tensor], window: Window, spare: SpareCounts | None = None,
                 base: torch.Tensor | None = None) -> None:
    """magnitude_window over order keys (as order_histogram)."""
    assert spare is None or (spare.coarse is None and spare.window is window)
    _counts(rows, base, None, None, window, spare, order=True)


SPARE_BYTES = 64 << 20  # the most spare counts of one histogram


class SpareCounts:
    """The histogram kernels' counts of the threads past the first, one row each, kept across calls and added
    to the ``coarse`` counts and the ``window``'s by ``flush``: no copy is made, zeroed and added up per call."""

    def __init__(self, coarse: torch.Tensor | None, window: Window | None = None) -> None:
        self.coarse, self.window = coarse, window
        cells = (0 if coarse is None else coarse.numel()) + (0 if window is None else window.fine.numel())
        rows = min(threads() - 1, SPARE_BYTES // max(1, cells * 8))
        self.counts = torch.zeros((max(0, rows), cells), dtype=torch.int64)

    def flush(self) -> None:
        """Add the spare counts to the caller's, and zero them."""
        if not self.counts.shape[0]:
            return
        total = self.counts.sum(0)
        split = 0 if self.coarse is None else self.coarse.numel()
        if self.coarse is not None:
            self.coarse.view(-1).add_(total[:split])
        if self.window is not None:
            self.window.fine.view(-1).add_(total[split:])
        self.counts.zero_()


def _counts(rows: list[torch.Tensor], base: torch.Tensor | None, counts: torch.Tensor | None, l1: torch.Tensor | None,
            window: Window | None, spare: SpareCounts | None, order: bool = False) -> None:
    assert _kernels is not None and all(r.is_contiguous() for r in rows)
    assert base is not None or all(takes(r) for r in rows)
    if window is not None:
        starts, width, fine, below = window
        assert starts.dtype == fine.dtype == torch.int64 and starts.is_contiguous() and fine.is_contiguous()
        assert fine.numel() == len(rows) * width and below.dtype == torch.float64 and below.is_contiguous()
    _kernels.magnitude_counts(KINDS[rows[0].dtype], 0 if base is None else base.data_ptr(),
                              tuple(r.data_ptr() for r in rows), rows[0].numel(),
                              0 if counts is None else counts.data_ptr(), 0 if l1 is None else l1.data_ptr(),
                              0 if window is None else window.starts.data_ptr(), 0 if window is None else window.width,
                              0 if window is None else window.fine.data_ptr(),
                              0 if window is None else window.below.data_ptr(),
                              0 if spare is None else spare.counts.data_ptr(),
                              0 if spare is None else spare.counts.shape[0], int(order))


def dare_keep(state: int, inc: int, length: int, bound: int) -> torch.Tensor:
    """The bool mask of ``length`` 32-bit draws < ``bound`` (< 2^32) of numpy's PCG64 at 128-bit ``state`` and
    increment ``inc`` (its ``state["state"]``): bit for bit ``numpy.less(PCG64.random_raw((length + 1) // 2)
    .view("<u4")[:length], bound)`` (each raw draw split into its low then its high 32 bits)."""
    assert _kernels is not None and 0 <= bound < 1 << 32
    keep = torch.empty((length + 1) // 2 * 2, dtype=torch.bool)  # both halves of every draw
    mask64 = (1 << 64) - 1
    _kernels.dare_keep(state >> 64, state & mask64, inc >> 64, inc & mask64, length, bound, keep.data_ptr(),
                       threads())
    return keep[:length]


def task_vectors_and_norms(tensors: list[torch.Tensor]
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(θ0, τ stacked (T, ...), ‖τ_t‖₁, ‖τ_t‖₂) of [θ0, θ_1..θ_T] as stored (``applies`` must hold):
    θ0 and τ_t = θ_t − θ0 in float32, the norms in float64, from one read of the inputs."""
    base = torch.empty(tensors[0].shape, dtype=torch.float32)
    deltas, l1, l2sq = _sweep(tensors, base, absolute=False)
    return base, deltas, l1, l2sq.sqrt_()


def abs_difference(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|x − base| in float32 of two tensors as stored (``applies`` must hold for [base, x])."""
    return _sweep([base, x], None, absolute=True)[0][0]


@dataclass
class Merged:
    """What kernels.merge returns for one piece."""

    out: torch.Tensor  # θ0 + delta, in the output dtype
    l1: torch.Tensor  # ‖τ_t‖₁ per task (float64)
    l2: torch.Tensor  # ‖τ_t‖₂ per task (float64)
    delta_norm: float  # ‖delta‖₂
    sign_total: int  # Σ of the elected signs before ties are filled (elect_* only)
    conflicts: int  # entries whose (trimmed) task values disagree in sign (with ``conflicts``)
    ties: torch.Tensor  # flat positions where an election's sum is 0 while a value is not (with ``ties``)


MERGE_FUNCTIONS = ("sum", "mean", "elect_sum", "elect_mean")  # the kernel's codes, in order


def merge(tensors: list[torch.Tensor], weights: torch.Tensor, merge_fn: str, dtype: torch.dtype, scale: float = 1.0,
          thresholds: torch.Tensor | None = None, majority: float = 0.0, conflicts: bool = False,
          ties: bool = False, drops: list[torch.Tensor] | None = None, keep: float = 1.0,
          write: bool = True) -> Merged:
    """θ0 + delta in ``dtype`` of [θ0, θ_1..θ_T] as stored (``applies`` must hold, ``dtype`` in KINDS), from
    one read of the inputs without making the task vectors, bit for bit the torch path's float32
    operations: the task vectors dropped where the bool masks ``drops`` (one per task, flat) are False
    and rescaled by 1/``keep`` as methods.common.dare_drop does (None: no drop), trimmed at
    ``thresholds`` (T,) as stats.TrimStat.mask does (None: no trim), ψ = ``merge_fn`` of them with
    ``weights`` (elect.merge_values, elections falling back to ``majority`` where a sum is 0),
    delta = ψ · ``scale``. Also the task vectors' norms, ‖delta‖, and
    what elections and ``conflicts`` (elect.sign_conflict_rate) need; ``ties``: keep the tie positions;
    not ``write``: the sums only (``out`` is empty; an election stops at its signs: ‖delta‖ is 0)."""
    assert _kernels is not None
    base, tasks = tensors[0], tensors[1:]
    w = weights.to(torch.float32).contiguous()
    thr = _thresholds(thresholds)
    out = torch.empty(base.shape if write else (0,), dtype=dtype)
    l1 = torch.empty(len(tasks), dtype=torch.float64)
    l2sq = torch.empty(len(tasks), dtype=torch.float64)
    positions = torch.empty(base.numel() if ties else 0, dtype=torch.int64)
    masks = () if drops is None else tuple(d.reshape(-1).contiguous().view(torch.uint8) for d in drops)
    assert all(m.numel() == base.numel() for m in masks)
    delta_sq, sign_total, conflict_count, tie_count = _kernels.merge(
        KINDS[base.dtype], KINDS[dtype], base.data_ptr(), tuple(t.data_ptr() for t in tasks), base.numel(),
        w.data_ptr(), 0 if thr is None else thr.data_ptr(), MERGE_FUNCTIONS.index(merge_fn), float(w.sum()),
        majority, scale, conflicts, tuple(m.data_ptr() for m in masks), keep, out.data_ptr() if write else 0,
        l1.data_ptr(),
        l2sq.data_ptr(), positions.data_ptr() if ties else 0, threads())
    return Merged(out, l1, l2sq.sqrt_(), delta_sq ** 0.5, sign_total, conflict_count,
                  positions[:tie_count].clone())


NEURON_MAX_TASKS = 16  # _kernels.c's NEURON_MAX_TASKS


def neuron_applies(rows: list[torch.Tensor], device: torch.device) -> bool:
    """Whether the neuron kernels take [θ0, θ_1..θ_T] as stored, viewed as rows (out, d)."""
    return applies(rows, device) and rows[0].ndim == 2 and len(rows) <= NEURON_MAX_TASKS + 1


def _thresholds(thresholds: torch.Tensor | None) -> torch.Tensor | None:
    return None if thresholds is None else thresholds.to(torch.float32).contiguous()


def neuron_gram(rows: list[torch.Tensor], thresholds: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q Qᵀ per row (out, T+1, T+1) float64 with Q = [τ_1; …; τ_T; w0] and τ_t trimmed at ``thresholds``
    as stats.TrimStat.mask does (None: no trim), ‖τ_t‖₁ and ‖τ_t‖₂ before the trim) of [θ0, θ_1..θ_T]
    as stored, each (out, d) (``neuron_applies`` must hold): one read of the inputs."""
    assert _kernels is not None
    base, tasks = rows[0], rows[1:]
    q = len(tasks) + 1
    gram = torch.empty((base.shape[0], q, q), dtype=torch.float64)
    l1 = torch.empty(len(tasks), dtype=torch.float64)
    l2sq = torch.empty(len(tasks), dtype=torch.float64)
    thr = _thresholds(thresholds)
    _kernels.neuron_gram(KINDS[base.dtype], base.data_ptr(), tuple(t.data_ptr() for t in tasks), base.shape[0],
                         base.shape[1], 0 if thr is None else thr.data_ptr(), gram.data_ptr(), l1.data_ptr(),
                         l2sq.data_ptr(), threads())
    return gram, l1, l2sq.sqrt_()


@dataclass
class NeuronOutput:
    """What kernels.neuron_output returns for one piece."""

    out: torch.Tensor  # θ0 + delta, in the output dtype
    delta_norm: float  # ‖delta‖₂
    parallel_sq: float  # ‖τ̄∥‖² (unscaled)
    orthogonal_sq: float  # ‖τ̄⊥‖² (unscaled)


def neuron_output(rows: list[torch.Tensor], thresholds: torch.Tensor | None, z: torch.Tensor, coefficient: torch.Tensor,
                  lambda1: float, lambda2: float, dtype: torch.dtype) -> NeuronOutput:
    """θ0 + λ1·τ̄∥ + λ2·τ̄⊥ in ``dtype`` of [θ0, θ_1..θ_T] as stored, each (out, d) (``neuron_applies`` must
    hold), in one read: per row, τ̄⊥ = Qᵀ z (z (out, T+1) float64, Q as in neuron_gram) rounded to float32,
    τ̄∥ = ``coefficient`` (out,) float32 · w0, and the float32 operations of the torch path after them."""
    assert _kernels is not None
    base, tasks = rows[0], rows[1:]
    z = z.to(torch.float64).contiguous()
    c = coefficient.to(torch.float32).contiguous()
    assert z.shape == (base.shape[0], len(tasks) + 1) and c.shape == (base.shape[0],)
    out = torch.empty(base.shape, dtype=dtype)
    thr = _thresholds(thresholds)
    delta_sq, parallel_sq, orthogonal_sq = _kernels.neuron_output(
        KINDS[base.dtype], KINDS[dtype], base.data_ptr(), tuple(t.data_ptr() for t in tasks), base.shape[0],
        base.shape[1], 0 if thr is None else thr.data_ptr(), z.data_ptr(), c.data_ptr(), lambda1, lambda2,
        out.data_ptr(), threads())
    return NeuronOutput(out, delta_sq ** 0.5, parallel_sq, orthogonal_sq)


def _sweep(tensors: list[torch.Tensor], base_out: torch.Tensor | None, absolute: bool
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel: τ_t (|τ_t| when ``absolute``) stacked, Σ|τ_t| and Σ τ_t², θ0 in float32 into ``base_out``."""
    assert _kernels is not None
    base, tasks = tensors[0], tensors[1:]
    out = torch.empty((len(tasks), *base.shape), dtype=torch.float32)
    l1 = torch.empty(len(tasks), dtype=torch.float64)
    l2sq = torch.empty(len(tasks), dtype=torch.float64)
    _kernels.task_vectors(KINDS[base.dtype], base.data_ptr(), tuple(t.data_ptr() for t in tasks), base.numel(),
                          out.data_ptr(), 0 if base_out is None else base_out.data_ptr(), l1.data_ptr(),
                          l2sq.data_ptr(), absolute, threads())
    return out, l1, l2sq
