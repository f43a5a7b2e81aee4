"""Whole-model statistics that methods need before merging, computed in streaming passes.

Each statistic sees every merged tensor's task vectors once per pass it asks for and keeps only
small summaries. The engine schedules them: a statistic with ``after`` runs its passes once that
one has finished, or alongside that one's last ``joins`` passes.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from . import kernels
from .cpu_threads import one_cpu_thread
from .memory import release_free_memory
from .sums import sign_total, sum_f64
from .topk import (LOW_BINS, Row, StoredMagnitudes, StreamingTopK, TrimSplit, capped_sums, kept_count,
                   row_threshold, tensor_thresholds, whole)


class GlobalStat:
    """A streaming reduction over all merged tensors."""

    key: str = ""
    passes: int = 1  # reads of the model; may grow in end_pass (the engine re-plans after every read)
    after: "GlobalStat | None" = None
    # passes shared with the last passes of ``after``: in a shared read this statistic observes each
    # tensor, and ends the pass, after ``after`` does (it must come after it in the list of statistics)
    joins: int = 0
    rowwise: bool = False  # observe() may see blocks of a tensor's rows instead of whole tensors
    # observed in the merge read instead, each tensor whole just before it is merged (``passes`` is 0): a
    # statistic whose figures only that tensor's merge needs; end_pass(0) is called after the merge pass
    in_merge_read: bool = False
    stored_inputs: bool = False  # the engine calls observe_stored() with the inputs as stored, not observe()
    samples: bool = False  # observe_sample() sees a sample of rows (engine.sample_pieces) before the first read

    def observe(self, pass_index: int, name: str, deltas: torch.Tensor, weights: torch.Tensor) -> None:
        raise NotImplementedError

    def observe_stored(self, pass_index: int, name: str, tensors: list[torch.Tensor], weights: torch.Tensor
                       ) -> torch.Tensor | None:
        """Like observe, from [θ0, θ_1..θ_T] in their storage dtype (on the CPU): a statistic that needs
        θ0, that works task by task to hold less than T float32 task vectors at once, or that a kernel
        computes from the stored inputs. Returns Σ|τ_t| (or another sum over each τ_t that a NaN or Inf
        makes non-finite) when it has it, for the engine to refuse non-finite inputs."""
        raise NotImplementedError

    def _observe_made(self, pass_index: int, name: str, tensors: list[torch.Tensor], weights: torch.Tensor,
                      device: torch.device) -> torch.Tensor:
        """observe_stored where no kernel takes the inputs: the task vectors made on ``device`` and observed;
        their sums returned."""
        deltas = float_task_vectors(tensors, device)[1]
        self.observe(pass_index, name, deltas, weights)
        return deltas.reshape(deltas.shape[0], -1).sum(1)

    def observe_sample(self, name: str, tensors: list[torch.Tensor], stride: int) -> None:
        """With ``samples``: a block of sampled rows of tensor ``name``, [θ0, θ_1..θ_T] as stored, on the CPU, of
        which every ``stride``-th entry of the sample (counted on across blocks) is to be kept."""
        raise NotImplementedError

    def end_sample(self) -> None:
        """Called once every sampled block has been observed."""

    def end_pass(self, pass_index: int) -> None:
        """Called once every tensor has been observed in ``pass_index``."""

    def partials(self, pass_index: int) -> list[torch.Tensor] | None:
        """The accumulators of ``pass_index`` that add up across processes, summed in place between the
        last ``observe`` and ``end_pass`` when tensors are split across ranks (it may be called more
        than once; the last call's tensors count); None: every rank observes every tensor."""
        return None

    def maxima(self, pass_index: int) -> list[torch.Tensor]:
        """Accumulators of ``pass_index`` that hold maxima: replaced in place by their maximum across processes,
        with the partial sums (only where ``partials`` is not None)."""
        return []

    def late_partials(self, pass_index: int) -> list[torch.Tensor] | None:
        """Sums that ``end_pass`` made from this process's own observations (e.g. held back until a
        prerequisite's result was known), summed in place across processes right after ``end_pass``."""
        return None

    def summary(self) -> dict[str, Any]:
        return {}


def float_task_vectors(tensors: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(θ0, τ stacked (T, ...)) in float32 on ``device`` from [θ0, θ_1..θ_T] as stored: each θ_t is
    converted straight into its slot and θ0 subtracted there (no separate float32 copies to stack).
    On a CPU, the fused kernel of task_vectors_and_norms where it applies."""
    if kernels.applies(tensors, device):
        base, deltas, _, _ = kernels.task_vectors_and_norms(tensors)  # the norms cost nothing more
        return base, deltas
    base = tensors[0].to(device, non_blocking=True).float()
    deltas = torch.empty((len(tensors) - 1, *base.shape), dtype=torch.float32, device=device)
    for t, task in enumerate(tensors[1:]):
        deltas[t].copy_(task.to(device, non_blocking=True)).sub_(base)
    return base, deltas


NORM_CHUNK = 1 << 18  # entries per task converted, subtracted and measured at a time by task_vectors_and_norms


def task_vectors_and_norms(tensors: list[torch.Tensor], device: torch.device
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """float_task_vectors, with ‖τ_t‖₁ and ‖τ_t‖₂ of each task (float64, on ``device``).

    Each τ_t is made chunk by chunk of NORM_CHUNK entries, and the chunk measured (float32 sums, added
    in float64) while it is in cache: on a CPU 1.5 times faster than converting the whole block and
    reading it again for each norm; the fused kernel (kernels.task_vectors_and_norms), where it applies, is
    another 2.5 times faster.
    """
    if kernels.applies(tensors, device):
        return kernels.task_vectors_and_norms(tensors)
    base = tensors[0].to(device, non_blocking=True).float()
    num_tasks, n = len(tensors) - 1, base.numel()
    deltas = torch.empty((num_tasks, *base.shape), dtype=torch.float32, device=device)
    flat_base, flat = base.reshape(-1), deltas.view(num_tasks, -1)
    chunks = max(1, -(-n // NORM_CHUNK))
    l1 = torch.zeros((num_tasks, chunks), dtype=torch.float32, device=device)
    l2sq = torch.zeros((num_tasks, chunks), dtype=torch.float32, device=device)
    scratch = torch.empty(min(n, NORM_CHUNK), dtype=torch.float32, device=device)
    for t, task in enumerate(tensors[1:]):
        source = task.to(device, non_blocking=True).reshape(-1)
        for c, lo in enumerate(range(0, n, NORM_CHUNK)):
            hi = min(n, lo + NORM_CHUNK)
            d = flat[t, lo:hi]
            d.copy_(source[lo:hi]).sub_(flat_base[lo:hi])
            torch.sum(torch.abs(d, out=scratch[: hi - lo]), dim=0, out=l1[t, c])
            torch.dot(d, d, out=l2sq[t, c])
    return base, deltas, l1.double().sum(1), l2sq.double().sum(1).sqrt()


DIFF_CHUNK = 1 << 20  # entries converted and subtracted at a time by abs_difference


def abs_difference(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|x − base| in float32 (a new tensor) of two tensors as stored, one chunk of DIFF_CHUNK entries at
    a time: both chunks converted while in cache. On a CPU twice as fast as subtracting a bfloat16
    tensor from a float32 one, which converts on the fly; no whole float32 copy of ``base`` is held.
    On a CPU, one fused sweep (kernels.abs_difference) where it applies."""
    if kernels.applies([base, x], x.device):
        return kernels.abs_difference(x, base)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    flat, xs, bs = out.view(-1), x.reshape(-1), base.reshape(-1)
    for lo in range(0, flat.numel(), DIFF_CHUNK):
        hi = lo + DIFF_CHUNK
        torch.sub(xs[lo:hi].float(), bs[lo:hi].float(), out=flat[lo:hi]).abs_()
    return out


def trimmed(deltas: torch.Tensor, thresholds: torch.Tensor, mags: torch.Tensor | None = None) -> torch.Tensor:
    """Task vectors ``deltas`` (T, ...) with the entries below their task's threshold (``thresholds``
    (T,)) set to 0; ``mags``: |deltas|, consumed, when the caller has it."""
    mags = deltas.abs() if mags is None else mags
    thr = thresholds.to(deltas.device).reshape((-1,) + (1,) * (deltas.ndim - 1))
    # 1.0 where kept, times τ; + 0.0 turns the −0.0 of a trimmed negative entry into +0.0. On a CPU
    # this is three times faster than where() over a boolean mask (NaN entries, allowed only with
    # --allow-nonfinite, stay NaN).
    return mags.ge_(thr).mul_(deltas).add_(0.0)


class TaskVectorSample:
    """The task vectors of a sample of rows (GlobalStat.observe_sample): every ``stride``-th entry, counted on
    across the sampled blocks, so that a block counts in proportion to its entries whatever its rows' width."""

    def __init__(self) -> None:
        self.blocks: list[torch.Tensor] = []  # (T, m_b) float32 τ of each sampled block
        self._seen = 0  # entries per task of the sampled blocks

    def add(self, tensors: list[torch.Tensor], stride: int) -> None:
        """A block of sampled rows [θ0, θ_1..θ_T] as stored."""
        start = -self._seen % stride
        self._seen += tensors[0].numel()
        kept = [x.reshape(-1)[start::stride].float() for x in tensors]
        self.blocks.append(torch.stack(kept[1:]).sub_(kept[0]))

    def take(self) -> list[torch.Tensor]:
        """The blocks, no longer held here."""
        blocks, self.blocks = self.blocks, []
        return blocks


class TrimStat(GlobalStat):
    """Top-k trim of every task vector: σ_t and, for the global scope, the exact thresholds.

    ``scope='global'``: one threshold per task over all merged tensors (two passes; ``sampled``: one
    where a sample of rows, read first, aims the first pass's window at the thresholds, see
    StreamingTopK.aim, and two where it misses).
    ``scope='tensor'``: one threshold per task and tensor; one pass, for σ_t and kept fractions, or
    none with ``in_merge_read`` (where nothing needs σ_t before merging): each tensor is observed in
    the merge read, just before it is merged.
    """

    key = "trim"

    def __init__(self, density: float, scope: str, num_tasks: int, device: torch.device,
                 in_merge_read: bool = False, sampled: bool = False) -> None:
        self.density = density
        self.scope = scope
        self.num_tasks = num_tasks
        self.in_merge_read = in_merge_read and scope == "tensor" and density < 1.0
        self.passes = 0 if density >= 1.0 or self.in_merge_read else (2 if scope == "global" else 1)
        self._topk = StreamingTopK(num_tasks, density, device) if self.passes == 2 else None
        self.samples = sampled and self._topk is not None
        if self.samples:
            self.passes = 1  # a second where the window misses (end_pass)
        self._sample = TaskVectorSample()
        self.device = torch.device(device)
        self._removed = torch.zeros(num_tasks, dtype=torch.float64)
        self._total = torch.zeros(num_tasks, dtype=torch.float64)
        self._kept = torch.zeros(num_tasks, dtype=torch.float64)
        self._n = torch.zeros(1, dtype=torch.float64)  # entries per task observed (a tensor, to be all-reduced)
        self._tensor_thr: dict[str, torch.Tensor] = {}  # per-tensor thresholds seen in the statistics pass
        self._split: tuple[torch.Tensor, TrimSplit] | None = None  # the last chunk of pass 2 and its split
        self.keep_split = False  # keep that split for one ``split`` call (a statistic sharing the read)
        self.rowwise = density >= 1.0 or scope == "global"

    def partials(self, pass_index: int) -> list[torch.Tensor] | None:
        if self._topk is not None:
            return self._topk.partials(pass_index)
        if self.in_merge_read:  # each rank observes the tensors it merges
            return [self._removed, self._total, self._kept, self._n]
        # per-tensor thresholds are cached for the merge pass, which may hand a rank other tensors (and
        # blocks of rows, whose threshold cannot be recomputed): every rank observes every tensor
        return None

    def observe(self, pass_index: int, name: str, deltas: torch.Tensor, weights: torch.Tensor) -> None:
        if self._topk is not None:  # global: |x| is read from the bits, no copy of |τ| needed
            if pass_index == 0:
                self._topk.observe_coarse(deltas)
            else:
                split = self._topk.observe_fine(deltas, self.keep_split)
                self._split = None if split is None else (deltas, split)
            return
        self._observe_tensor(name, deltas.shape[0], lambda t: deltas[t].abs().reshape(-1))

    @property
    def stored_inputs(self) -> bool:  # type: ignore[override]
        """A per-tensor trim reads the stored inputs task by task; a global one where the kernels count |τ|
        straight from them (a CPU), unless a statistic shares the split of its second read (keep_split)."""
        if self._topk is None:
            return self.passes == 1 or self.in_merge_read
        return kernels.ENABLED and self.device.type == "cpu" and not self.keep_split

    def observe_stored(self, pass_index: int, name: str, tensors: list[torch.Tensor], weights: torch.Tensor
                       ) -> torch.Tensor | None:
        if self._topk is None:
            if kernels.applies(tensors, self.device):  # |τ_t| read by the kernels, not made
                return self._observe_tensor(name, len(tensors) - 1, lambda t: StoredMagnitudes(tensors[t + 1],
                                                                                                tensors[0]))
            base = tensors[0].to(self.device)
            return self._observe_tensor(name, len(tensors) - 1,
                                        lambda t: abs_difference(tensors[t + 1].to(self.device), base).reshape(-1))
        if kernels.applies(tensors, self.device):
            return self._topk.observe_stored(pass_index, tensors)
        return self._observe_made(pass_index, name, tensors, weights, self.device)

    def observe_sample(self, name: str, tensors: list[torch.Tensor], stride: int) -> None:
        self._sample.add(tensors, stride)

    def end_sample(self) -> None:
        assert self._topk is not None
        self._topk.aim(self._sample.take())
        if self._topk.window is None:  # nothing sampled: the two reads
            self.passes = 2

    def _observe_tensor(self, name: str, num_tasks: int, magnitudes: Callable[[int], Row]) -> torch.Tensor:
        """Per-tensor thresholds, cached, and the sums behind σ_t, one task at a time: ``magnitudes(t)``
        is a fresh flat float32 |τ_t| of the tensor (consumed), or the StoredMagnitudes the kernels read it from.

        The entries kept are those not below the threshold, counted while finding it; the L1 norm
        trimmed is Σ min(|τ|, thr) − thr · kept, exact up to float64 rounding of the sums (absolute
        error in σ_t ~1e-16). NaN or Inf (with --allow-nonfinite) are counted and summed plainly.
        Returns the tensor's Σ|τ_t|.
        """
        thr = torch.empty(num_tasks, dtype=torch.float32)
        totals = torch.empty(num_tasks, dtype=torch.float64)
        n = 0
        for t in range(num_tasks):
            mags = magnitudes(t)
            n = mags.numel()
            value, below = row_threshold(mags, self.density)
            thr[t] = value
            total, capped = capped_sums(mags, value)
            if math.isfinite(total):
                kept = n - below
                removed = max(0.0, capped - float(value) * kept)
            else:
                mags = whole(mags)
                keep = mags >= value  # on mags.device, as row_threshold found it there
                kept = int(torch.count_nonzero(keep))
                removed = sum_f64(mags.masked_fill_(keep, 0.0))
            totals[t] = total
            self._kept[t] += kept
            self._removed[t] += removed
            del mags
        self._total += totals
        self._tensor_thr[name] = thr
        self._n += n
        return totals

    def end_pass(self, pass_index: int) -> None:
        if self._topk is None:
            release_free_memory()  # the whole tensors' temporaries, before the merge pass
            return
        if pass_index == 0:
            self._topk.end_coarse()
            if not self._topk.resolved:
                self.passes = 2
                return
        else:
            self._split = None
            self._topk.end_fine()
        self._removed = torch.tensor(self._topk.removed_l1, dtype=torch.float64)
        self._total = torch.tensor(self._topk.total_l1, dtype=torch.float64)
        self._kept = torch.tensor(self._topk.kept, dtype=torch.float64)
        self._n = torch.tensor([float(self._topk.n)], dtype=torch.float64)

    def split(self, deltas: torch.Tensor) -> TrimSplit:
        """Where the entries of ``deltas`` stand against the global thresholds' bins while pass 2 runs
        (with ``keep_split``, the split made when this statistic observed ``deltas``, handed over once)."""
        assert self._topk is not None, "a global trim in its second pass"
        kept, self._split = self._split, None
        if kept is not None and kept[0] is deltas:
            return kept[1]
        return self._topk.split(deltas)

    @property
    def thresholds_pending(self) -> bool:
        """True when the statistics passes find global thresholds (a split exists in the second)."""
        return self._topk is not None

    @property
    def bins(self) -> torch.Tensor | None:
        """Global trim: the high 16 bits of each task's threshold (T,), known after the first pass; else None."""
        return None if self._topk is None else self._topk.bins

    @property
    def thresholds(self) -> torch.Tensor | None:
        """Global per-task thresholds (T,), or None when trimming is per tensor or off."""
        return None if self._topk is None else self._topk.thresholds

    def knows_thresholds(self, name: str) -> bool:
        """Whether tensor ``name``'s thresholds are known without its task vectors (thresholds_of)."""
        return self.density >= 1.0 or self.scope == "global" or name in self._tensor_thr

    def thresholds_of(self, name: str | None) -> torch.Tensor | None:
        """Tensor ``name``'s per-task thresholds (T,) when known (knows_thresholds); None: no trim."""
        if self.density >= 1.0:
            return None
        return self.thresholds if self.scope == "global" or name is None else self._tensor_thr[name]

    def mask(self, deltas: torch.Tensor, name: str | None = None) -> torch.Tensor:
        """The trimmed task vectors m_t ∘ τ_t of one tensor (T, ...); with its ``name``, per-tensor
        thresholds already found in the statistics pass are reused."""
        if self.density >= 1.0:
            return deltas
        mags = deltas.abs()
        known = self.scope == "global" or (name is not None and self.knows_thresholds(name))
        thr = self.thresholds_of(name) if known else tensor_thresholds(mags, self.density)
        assert thr is not None
        return trimmed(deltas, thr, mags)

    @property
    def sigma(self) -> list[float]:
        """σ_t = ‖τ_t − m_t∘τ_t‖₁ / ‖τ_t‖₁ per task (0 when τ_t = 0 or nothing is trimmed)."""
        return [float(r / t) if t > 0 else 0.0 for r, t in zip(self._removed.tolist(), self._total.tolist())]

    def summary(self) -> dict[str, Any]:
        n = int(self._n[0])
        thr = self.thresholds
        return {
            "density": self.density,
            "mask_scope": self.scope,
            "entries_per_task": n,
            "threshold": None if thr is None else [float(x) for x in thr.tolist()],
            "kept_fraction": [float(k / n) if n else 1.0 for k in self._kept.tolist()] if self.density < 1.0 else [1.0] * self.num_tasks,
            "sigma": self.sigma,
        }


STASH_ROWS = 1 << 20  # distinct entries the folded majority may hold for ambiguous coordinates
GATHERED_COLUMNS = 1 << 16  # open coordinates gathered from the kernels before their bookkeeping


class Tally:
    """Rows (m, k) of integers with a weight each, equal rows merged (summing their weights) once
    more than STASH_ROWS are held; ``full`` once STASH_ROWS / 2 distinct ones remain after merging."""

    def __init__(self) -> None:
        self._rows: list[torch.Tensor] = []
        self._weights: list[torch.Tensor] = []
        self.size = 0
        self.full = False

    def add(self, rows: torch.Tensor, weights: torch.Tensor) -> None:
        self._rows.append(rows)
        self._weights.append(weights)
        self.size += rows.shape[0]
        if self.size > STASH_ROWS:
            rows, weights = self.merged()
            self.full = rows.shape[0] > STASH_ROWS // 2
            self._rows, self._weights, self.size = [rows], [weights], rows.shape[0]

    def merged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The distinct rows and their summed weights."""
        rows, weights = torch.cat(self._rows), torch.cat(self._weights)
        if rows.shape[1] == 1:  # keys: the flat unique sorts once, without unique_dim's row comparisons
            unique, inverse = torch.unique(rows[:, 0], return_inverse=True)
            unique = unique.unsqueeze(1)
        else:
            unique, inverse = torch.unique(rows, dim=0, return_inverse=True)
        return unique, torch.zeros(unique.shape[0], dtype=weights.dtype).index_add_(0, inverse, weights)


class MajoritySignStat(GlobalStat):
    """sign(Σ over all coordinates of the elected sign) of the trimmed, weighted task vectors, found in
    statistics reads.

    TIES with a global mask falls back to this sign where a coordinate's sum is exactly zero. TIES on
    its own finds it in the merge read (ModelMajorityStat); as a delegate of NeuronMerge, whose merge
    read elects sub-tensors, over its scope with this statistic.

    After a two-pass global trim it shares the trim's second read (``joins = 1``), before the exact
    thresholds are known: an entry above its task's threshold bin is kept, one below it trimmed,
    and one inside the bin is undecided until the threshold's low 16 bits are known (kept iff its
    own low bits reach them: an indicator d). A coordinate's sign s is then a polynomial in its
    undecided entries' d: with none, s; with one entry u, s₀ + d_u (s_u − s₀) (s₀: all trimmed,
    s_u: u kept), the change filed in a histogram under u's task and low bits, which counts once
    those bits reach the threshold's; with two, the same per entry plus d_u d_v times their
    interaction, tallied by the pair's tasks and low bits (few distinct ones: in-bin entries share
    their high bits). Coordinates with three or more (about the cube of the in-bin share) are held
    as their task values, trimmed ones zeroed and equal rows merged, and settled at the end. Past
    STASH_ROWS distinct pairs or rows, a third read computes the sign plainly. On a CPU with the kernels,
    one sweep of the stored inputs settles the coordinates with at most two undecided entries
    (kernels.open_signs) and only the others' task vectors are made, for the bookkeeping above.
    """

    key = "majority"

    def __init__(self, trim: TrimStat, fold: bool = True) -> None:
        """``fold=False``: always a read of its own after the trim's (the plain computation)."""
        self.after = trim
        self._trim = trim
        self.rowwise = trim.rowwise
        self.passes = 1
        self.folded = fold and trim.thresholds_pending
        on_kernels = kernels.ENABLED and trim.device.type == "cpu"
        # the plain read, and the folded one where the kernels sort the coordinates out: from the stored inputs
        self.stored_inputs = on_kernels or not self.folded
        self.joins = 1 if self.folded else 0
        trim.keep_split = self.folded and not on_kernels  # else the torch split of the trim's read is shared
        num_tasks = trim.num_tasks
        self._sum = torch.zeros(1, dtype=torch.float64)  # a sum of signs: exact in float64
        self._late = torch.zeros(1, dtype=torch.float64)  # the held coordinates' part, per process
        device = trim.device if self.folded else torch.device("cpu")
        self._flips = torch.zeros(num_tasks * LOW_BINS, dtype=torch.float64, device=device)
        self._overflow = torch.zeros(1, dtype=torch.int64)
        self._pairs = Tally()  # (task pair, low bits of both) → Σ interaction, of 2-undecided coordinates
        self._rows = Tally()  # τ bits (T,) of coordinates with 3 or more undecided entries → count
        self._weights: torch.Tensor | None = None  # the weights, once coordinates are held or gathered
        self._gathered: list[torch.Tensor] = []  # task vectors (T, m) of coordinates kernels.open_signs left open

    def observe(self, pass_index: int, name: str, deltas: torch.Tensor, weights: torch.Tensor) -> None:
        if self.folded and pass_index == 0:
            if not self._overflow.item():
                self._observe_folded(deltas, weights)
            return
        w = weights.reshape((-1,) + (1,) * (deltas.ndim - 1))
        self._sum += signs_sum(self._trim.mask(deltas, name) * w).cpu()

    def observe_stored(self, pass_index: int, name: str, tensors: list[torch.Tensor], weights: torch.Tensor
                       ) -> torch.Tensor | None:
        """The elected signs summed by the fused kernels where they apply (the same signs, bit for bit), else
        as ``observe``: in the plain read by kernels.merge; folded, the decided coordinates by
        kernels.open_signs (at most two undecided entries) and the task vectors of the others made for
        ``_observe_folded``."""
        device = self._trim.device
        if self.folded and pass_index == 0:
            if not kernels.applies(tensors, device):
                self._observe_made(pass_index, name, tensors, weights, device)
            elif not self._overflow.item():
                bins = self._trim.bins
                assert bins is not None
                settled = kernels.open_signs(tensors, weights, bins, self._flips)
                self._sum += float(settled.sign_total)
                if settled.pair_keys.numel():
                    self._pairs.add(settled.pair_keys.unsqueeze(1), settled.pair_joints)
                    self._check_bound()
                columns = settled.positions
                if columns.numel():  # gathered over chunks: the bookkeeping's torch calls cost per call
                    picked = [t.reshape(-1).index_select(0, columns) for t in tensors]
                    self._gathered.append(float_task_vectors(picked, device)[1])
                    self._weights = weights
                    if sum(x.shape[1] for x in self._gathered) >= GATHERED_COLUMNS:
                        self._fold_gathered()
            return None
        if kernels.applies(tensors, device):
            thresholds = self._trim.thresholds_of(name)
            sums = kernels.merge(tensors, weights.cpu(), "elect_sum", tensors[0].dtype, thresholds=thresholds,
                                 write=False)
            self._sum += float(sums.sign_total)
            return sums.l1
        return self._observe_made(pass_index, name, tensors, weights, device)

    def _fold_gathered(self) -> None:
        """The gathered columns' bookkeeping (``_observe_folded``), before the pass's sums are read."""
        if self._gathered and not self._overflow.item():
            assert self._weights is not None
            with one_cpu_thread(self._trim.device):
                self._observe_folded(torch.cat(self._gathered, dim=1), self._weights)
        self._gathered = []

    def _observe_folded(self, deltas: torch.Tensor, weights: torch.Tensor) -> None:
        split = self._trim.split(deltas)
        flat = deltas.reshape(deltas.shape[0], -1)
        # the products the merge pass elects on, bit for bit (x · 1 = x: no product needed)
        weighted = flat if bool((weights == 1).all()) else flat * weights.reshape(-1, 1)
        kept = (weighted.view(torch.int32) & split.kept_mask()).view(torch.float32)  # trimmed → +0.0
        s_trimmed = torch.sign(kept.sum(0))
        self._sum += sign_total(s_trimmed).cpu()
        if not split.columns.numel():
            return
        cols = split.columns
        open_ = split.open[cols]
        tasks = torch.arange(flat.shape[0], device=flat.device).unsqueeze(1)
        one = (open_ == 1).nonzero().squeeze(1)
        if one.numel():  # s = s_trimmed + [kept] · (s if kept − s_trimmed)
            u = split.undecided[:, one]
            c = cols[one]
            s_u = torch.sign(torch.where(u, weighted[:, c], kept[:, c]).sum(0))
            task = (u * tasks).sum(0)
            self._file(task, split.low[:, one].gather(0, task.unsqueeze(0)).squeeze(0), s_u - s_trimmed[c])
        two = (open_ == 2).nonzero().squeeze(1)
        if two.numel():  # the same per entry, and the interaction of the two, filed by both entries' low bits
            both = split.undecided[:, two]
            c = cols[two]
            first = torch.where(both, tasks, flat.shape[0]).amin(0)
            second = (both * tasks).amax(0)
            w, k = weighted[:, c], kept[:, c]
            s_first = torch.sign(torch.where(tasks == first, w, k).sum(0))
            s_second = torch.sign(torch.where(tasks == second, w, k).sum(0))
            s_both = torch.sign(torch.where(both, w, k).sum(0))
            low = split.low[:, two]
            low_first = low.gather(0, first.unsqueeze(0)).squeeze(0)
            low_second = low.gather(0, second.unsqueeze(0)).squeeze(0)
            self._file(first, low_first, s_first - s_trimmed[c])
            self._file(second, low_second, s_second - s_trimmed[c])
            joint = s_both - s_first - s_second + s_trimmed[c]
            some = joint != 0
            if bool(some.any()):
                key = ((first * flat.shape[0] + second) << 32) | (low_first.long() << 16) | low_second.long()
                self._pairs.add(key[some].unsqueeze(1).cpu(), joint[some].double().cpu())
        many = (open_ >= 3).nonzero().squeeze(1)
        if many.numel():
            held = cols[many]
            self._sum -= sign_total(s_trimmed[held]).cpu()  # settled at the end instead
            rows = torch.where(split.high[:, held] >= split.bins, flat[:, held], 0.0)  # τ, trimmed ones 0
            self._rows.add(rows.t().contiguous().view(torch.int32).cpu(), torch.ones(held.numel(), dtype=torch.float64))
            self._weights = weights
        self._check_bound()

    def _check_bound(self) -> None:
        if self._pairs.full or self._rows.full:  # too many distinct ones: a plain read follows
            self._overflow.fill_(1)
            self._pairs, self._rows = Tally(), Tally()

    def _file(self, task: torch.Tensor, low: torch.Tensor, change: torch.Tensor) -> None:
        """Add ``change`` (per coordinate) under each entry's task and low bits: it counts once the
        threshold's low bits are at most the entry's."""
        some = change != 0  # index_add_: no pass over all T · 2^16 bins per chunk (sums of integers: exact)
        self._flips.index_add_(0, (task * LOW_BINS + low)[some].long(), change[some].double())

    def partials(self, pass_index: int) -> list[torch.Tensor] | None:
        if self.folded and pass_index == 0:
            self._fold_gathered()
            return [self._sum, self._flips, self._overflow]
        return [self._sum]

    def late_partials(self, pass_index: int) -> list[torch.Tensor] | None:
        return [self._late] if self.folded and pass_index == 0 else None

    def end_pass(self, pass_index: int) -> None:
        if not (self.folded and pass_index == 0):
            return
        self._fold_gathered()
        if self._overflow.item():  # on any process: the plain pass follows
            self.passes = 2
            self._sum.zero_()
        else:
            thresholds = self._trim.thresholds
            assert thresholds is not None
            low = thresholds.view(torch.int32).to(self._flips.device) & 0xFFFF
            reached = torch.arange(LOW_BINS, device=low.device).unsqueeze(0) >= low.unsqueeze(1)
            self._sum += torch.where(reached, self._flips.view(-1, LOW_BINS), 0.0).sum().cpu()
            if self._pairs.size:
                keys, joint = self._pairs.merged()
                keys = keys.squeeze(1)
                pair, low_first, low_second = keys >> 32, (keys >> 16) & 0xFFFF, keys & 0xFFFF
                num_tasks = self._trim.num_tasks
                low = low.cpu()
                hit = (low_first >= low[pair // num_tasks]) & (low_second >= low[pair % num_tasks])
                self._late += torch.where(hit, joint, 0.0).sum()
            if self._rows.size:
                rows, counts = self._rows.merged()
                # (T, m) contiguous: sum(0) then adds the tasks in the order the merge pass does
                values = rows.view(torch.float32).t().contiguous().to(thresholds.device)
                assert self._weights is not None
                w = self._weights.reshape(-1, 1)
                kept = values.abs() >= thresholds.unsqueeze(1)
                signs = torch.sign(torch.where(kept, values * w, 0.0).sum(0)).cpu()
                self._late += (signs.double() * counts).sum()
        self._pairs, self._rows = Tally(), Tally()

    @property
    def total(self) -> float:
        """Σ over all coordinates of the elected sign (an integer)."""
        return float((self._sum + self._late).item())

    @property
    def sign(self) -> float:
        total = self.total
        return float((total > 0) - (total < 0))

    def summary(self) -> dict[str, Any]:
        return {"majority_sign": self.sign}


SignSum = Callable[[str, torch.Size, int, torch.Tensor, torch.Tensor, torch.Tensor], float]
"""(name, the tensor's shape, first row, θ0 rows (r, n) float32, τ rows (T, r, n) float32, weights) →
Σ over those rows of the elected signs sign(Σ_t w_t x_t) of the values x a method elects on."""

ROW_CHUNK_ELEMENTS = 1 << 20  # entries per task of one block of rows in TensorMajorityStat


Reader = Callable[[str, tuple[int, int]], list[torch.Tensor]]
"""(name, rows [start, stop)) → the block of those rows of [θ0, θ_1..θ_T] as stored, on the CPU."""


class TensorMajorityStat(GlobalStat):
    """Per tensor, the majority sign m = sign(Σ over the tensor of the elected signs).

    An election falls back to m where Σ_t w_t x_t = 0 exactly while some x_t ≠ 0, and the group is the
    tensor (per-tensor TIES, DARE-TIES, NeuroMerging's parallel coefficients). Two ways to find m for
    a tensor merged in blocks of rows:

    - from the merge pass (``sign_sum`` None): each block adds its Σ of signs (``add``) and elects
      ties with a ``guess``, mended once the tensor's last block is in (elect.DeferredMajority);
    - on demand (``sign_sum`` given): the first block with a tie reads the tensor's inputs again
      (``reader``, set by the engine with ``shapes``) in blocks of about ROW_CHUNK_ELEMENTS entries,
      ``sign_sum`` giving each block's Σ of signs (a sum of ±1 and 0: exact in float64), and caches m.
      For elections whose mending would change more than the tied entries (NeuroMerging's per-neuron
      coefficients scale whole rows).
    """

    key = "tensor_majority"
    passes = 0

    def __init__(self, sign_sum: SignSum | None, device: torch.device) -> None:
        self._sign_sum = sign_sum
        self.device = torch.device(device)
        self.reader: Reader | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._sums: dict[str, float] = {}
        self.blocks_mended = 0

    @property
    def deferred(self) -> bool:
        """Whether the merge pass finds m (elect.DeferredMajority) rather than a second read."""
        return self._sign_sum is None

    def add(self, name: str, total: float) -> None:
        """Add a block's Σ of elected signs to tensor ``name``'s total (deferred)."""
        self._sums[name] = self._sums.get(name, 0.0) + total

    def sign(self, name: str) -> float:
        """The sign of tensor ``name``'s total so far: m once every block has been added."""
        total = self._sums.get(name, 0.0)
        return float((total > 0) - (total < 0))

    def guess(self, name: str) -> float:
        """A block's guess of m (deferred): the sign of the blocks so far, +1 before any."""
        return self.sign(name) or 1.0

    def majority(self, name: str, weights: torch.Tensor) -> float:
        """m of tensor ``name`` (of ndim >= 1), read from its inputs the first time it is asked for."""
        if name not in self._sums:
            if self.reader is None or self._sign_sum is None:
                raise RuntimeError("TensorMajorityStat: no reader to find a tensor's majority sign")
            shape = torch.Size(self.shapes[name])
            per_row = shape[1:].numel()
            step = max(1, ROW_CHUNK_ELEMENTS // max(1, per_row))
            total = 0.0
            for r0 in range(0, shape[0], step):
                views = [t.reshape(t.shape[0], -1) for t in self.reader(name, (r0, min(shape[0], r0 + step)))]
                base, deltas = float_task_vectors(views, self.device)
                total += self._sign_sum(name, shape, r0, base, deltas, weights)
            self._sums[name] = total
        return self.sign(name)

    def summary(self) -> dict[str, Any]:
        if self.deferred:  # blocks elected with a wrong guess, mended after their tensor's last block
            return {"blocks_mended": self.blocks_mended}
        return {"tensors_read_again": len(self._sums)}  # blocks of these tensors had an exact tie


class ModelMajorityStat(TensorMajorityStat):
    """The majority sign of one group, every merged tensor (global-trim TIES), found in the merge read:
    each block, whole tensors included, adds its Σ of elected signs and elects its ties with a guess (the
    sign of the blocks so far, +1 before any), as TensorMajorityStat does for a tensor; once the last
    tensor is merged and the totals of all processes are added up (``total``), the engine mends the
    blocks that guessed wrong. No read of its own: ``trim`` finds the thresholds it elects with."""

    key = "majority"

    def __init__(self, trim: TrimStat, device: torch.device) -> None:
        super().__init__(None, device)
        self.after = trim
        self.total = torch.zeros(1, dtype=torch.float64)  # Σ of the elected signs (exact in float64)

    def add(self, name: str, total: float) -> None:
        self.total += total

    def sign(self, name: str = "") -> float:
        """m: the sign of the total so far (of every block once the merge read is over)."""
        total = float(self.total.item())
        return float((total > 0) - (total < 0))

    def summary(self) -> dict[str, Any]:
        return {"majority_sign": self.sign(), "blocks_mended": self.blocks_mended}


def deferred_majority(stats: dict[str, GlobalStat], block: bool) -> TensorMajorityStat | None:
    """The statistic an election with its group's majority sign takes it from, where the group is not the
    elected piece itself: the model's (global-trim TIES), or the tensor's for a ``block`` of its rows."""
    model = stats.get("majority")
    if isinstance(model, ModelMajorityStat):
        return model
    stat = stats.get("tensor_majority")
    return stat if block and isinstance(stat, TensorMajorityStat) else None


def signs_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ over the coordinates of sign(Σ_t x_t) for x (T, ...), exactly, as a 0-d float64 tensor."""
    return sign_total(torch.sign(x.sum(0)))


__all__ = ["GlobalStat", "TrimStat", "MajoritySignStat", "TensorMajorityStat", "ModelMajorityStat", "kept_count"]
