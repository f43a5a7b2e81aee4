"""Whole-model statistics that methods need before merging, computed in streaming passes.

Each statistic sees every merged tensor's task vectors once per pass it asks for and keeps only
small summaries. The engine schedules them: a statistic with ``after`` runs its passes once that
one has finished.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from . import kernels
from .chunking import chunk_size
from .memory import release_free_memory
from .sums import sign_total, sum_f64
from .topk import (Row, StoredMagnitudes, StreamingTopK, capped_sums, kept_count, row_threshold, tensor_thresholds,
                   whole)


class GlobalStat:
    """A streaming reduction over all merged tensors."""

    key: str = ""
    passes: int = 1  # reads of the model; may grow in end_pass (the engine re-plans after every read)
    after: "GlobalStat | None" = None  # runs once this one has finished (it comes after it in the list)
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

    def observe_sample(self, name: str, tensors: list[torch.Tensor], stride: int, rows: tuple[int, int]) -> None:
        """With ``samples``: a block of sampled ``rows`` [start, stop) of tensor ``name``, [θ0, θ_1..θ_T] as stored,
        on the CPU, of which every ``stride``-th entry of the sample (counted on across blocks) is to be kept."""
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
    another 2.5 times faster. On a GPU the chunks are chunking's, a block at once.
    """
    if kernels.applies(tensors, device):
        return kernels.task_vectors_and_norms(tensors)
    base = tensors[0].to(device, non_blocking=True).float()
    num_tasks, n = len(tensors) - 1, base.numel()
    deltas = torch.empty((num_tasks, *base.shape), dtype=torch.float32, device=device)
    flat_base, flat = base.reshape(-1), deltas.view(num_tasks, -1)
    step = chunk_size(NORM_CHUNK, base.device)
    chunks = max(1, -(-n // step))
    l1 = torch.zeros((num_tasks, chunks), dtype=torch.float32, device=device)
    l2sq = torch.zeros((num_tasks, chunks), dtype=torch.float32, device=device)
    scratch = torch.empty(min(n, step), dtype=torch.float32, device=device)
    for t, task in enumerate(tensors[1:]):
        source = task.to(device, non_blocking=True).reshape(-1)
        for c, lo in enumerate(range(0, n, step)):
            hi = min(n, lo + step)
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
    step = chunk_size(DIFF_CHUNK, x.device)
    for lo in range(0, flat.numel(), step):
        hi = lo + step
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
                self._topk.observe_fine(deltas)
            return
        self._observe_tensor(name, deltas.shape[0], lambda t: deltas[t].abs().reshape(-1))

    @property
    def stored_inputs(self) -> bool:  # type: ignore[override]
        """A per-tensor trim reads the stored inputs task by task; a global one where the kernels count |τ|
        straight from them (a CPU)."""
        if self._topk is None:
            return self.passes == 1 or self.in_merge_read
        return kernels.ENABLED and self.device.type == "cpu"

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

    def observe_sample(self, name: str, tensors: list[torch.Tensor], stride: int, rows: tuple[int, int]) -> None:
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
            self._topk.end_fine()
        self._removed = torch.tensor(self._topk.removed_l1, dtype=torch.float64)
        self._total = torch.tensor(self._topk.total_l1, dtype=torch.float64)
        self._kept = torch.tensor(self._topk.kept, dtype=torch.float64)
        self._n = torch.tensor([float(self._topk.n)], dtype=torch.float64)

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


class MajoritySignStat(GlobalStat):
    """sign(Σ over all coordinates of the elected sign) of the trimmed, weighted task vectors, in a statistics
    read after the trim's (its exact thresholds are needed).

    TIES with a global mask falls back to this sign where a coordinate's sum is exactly zero. TIES on
    its own finds it in the merge read (ModelMajorityStat); as a delegate of NeuronMerge, whose merge
    read elects sub-tensors, over its scope with this statistic.
    """

    key = "majority"
    passes = 1
    stored_inputs = True  # the kernels sum the elected signs straight from the stored inputs where they apply

    def __init__(self, trim: TrimStat) -> None:
        self.after = trim
        self._trim = trim
        self.rowwise = trim.rowwise
        self._sum = torch.zeros(1, dtype=torch.float64)  # a sum of signs: exact in float64

    def observe(self, pass_index: int, name: str, deltas: torch.Tensor, weights: torch.Tensor) -> None:
        w = weights.reshape((-1,) + (1,) * (deltas.ndim - 1))
        self._sum += signs_sum(self._trim.mask(deltas, name) * w).cpu()

    def observe_stored(self, pass_index: int, name: str, tensors: list[torch.Tensor], weights: torch.Tensor
                       ) -> torch.Tensor | None:
        """The elected signs summed by the fused kernels (kernels.merge without writing: the same signs, bit for
        bit) where they apply, else as ``observe``."""
        device = self._trim.device
        if kernels.applies(tensors, device):
            thresholds = self._trim.thresholds_of(name)
            sums = kernels.merge(tensors, weights.cpu(), "elect_sum", tensors[0].dtype, thresholds=thresholds,
                                 write=False)
            self._sum += float(sums.sign_total)
            return sums.l1
        return self._observe_made(pass_index, name, tensors, weights, device)

    def partials(self, pass_index: int) -> list[torch.Tensor] | None:
        return [self._sum]

    @property
    def total(self) -> float:
        """Σ over all coordinates of the elected sign (an integer)."""
        return float(self._sum.item())

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
