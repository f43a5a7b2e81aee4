"""pcb: PCB-Merging (Du et al., NeurIPS 2024) — parameter competition balancing, exact and streamed.

Per task t over its whole flattened task vector (N entries), following the authors' code
(duguodong7/pcb-merging, ``PCB_merge``):

1. clamp: τ̃_t = sign(τ_t)·clamp(|τ_t|, lo_t, hi_t); lo_t = the (⌊rN⌋+1)-th smallest |τ_t|,
   hi_t = the max(1, ⌊(1−r)N⌋)-th smallest, r = 0.0001 (their ``sorted[int(N·r)]`` and
   ``sorted[int(N·(1−r)−1)]``).
2. intra_t = exp(T·m_t²), m_t = (|τ̃_t| − lo_t)/(hi_t − lo_t) (min-max of |τ̃_t|, whose min and max
   are lo_t and hi_t; 0 where hi_t = lo_t); T = number of tasks, as in their ``exp(n·…)``.
3. inter_t = tanh(τ_t · Σ_s τ_s) (unclamped, unweighted); β_t = intra_t·inter_t.
4. q_t = the (⌊(1−ratio)N⌋+1)-th smallest β_t (capped at N; their ``sorted[int(N·(1−ratio))]``,
   but with (1−ratio)·N exact from the decimal given, where their float product can land one rank
   lower), M_t = max β_t; b_t = (max(β_t, q_t) − q_t)/(M_t − q_t) (0 where M_t = q_t).
5. θ = θ0 + λ Σ_t w_t b_t τ̃_t / max(Σ_t w_t b_t, 1e-12). Recipe weights w_t scale b_t (all 1: the
   authors' formula; a common factor cancels).

lo, hi and q are exact global order statistics (StreamingSelect), M a running max: a read for the clamp
bounds, then one for q and M, before the merge pass; a sample of rows read first aims each read's windows
at the ranks, and a read whose window misses is followed by a second (at most four statistics reads).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Iterator, NamedTuple

import torch

from .. import kernels
from ..chunking import chunk_size
from ..stats import GlobalStat, TaskVectorSample
from ..topk import StreamingSelect, column_chunks
from .base import Method, TensorJob, TensorParts
from .common import LAMBDA
from .params import number

CLAMP_RATIO = Fraction(1, 10000)  # the authors' fixed outlier clamp: 0.0001 at each end


def rank_below(n: int, fraction: Fraction) -> int:
    """1-based rank of the authors' ``sorted(x)[int(n·fraction)]``, capped at n (n ≥ 1)."""
    return min(n, int(n * fraction) + 1)


def clamp_ranks(n: int) -> tuple[int, int]:
    """Ranks (ascending, 1-based) of the lower and upper clamp bounds of |τ_t| among n entries."""
    upper = max(1, int(n * (1 - CLAMP_RATIO)))
    return rank_below(n, CLAMP_RATIO), upper


def score_rank(n: int, ratio: float) -> int:
    """Rank of q_t: β below it is raised to it, so about ``ratio`` of the entries keep b_t > 0."""
    return rank_below(n, 1 - Fraction(str(ratio)))


BALANCE_COLUMNS = 1 << 16  # columns of (T, n) task vectors balanced at once: the temporaries stay in the cache


class Clamp(NamedTuple):
    """The clamp bounds as the scores use them: lo, hi (T, 1), the divisor of the min-max scaling (hi − lo, 1
    where that is 0) and where it is 0 (None where it is nowhere): made once, not per chunk."""

    lo: torch.Tensor
    hi: torch.Tensor
    span: torch.Tensor
    constant: torch.Tensor | None

    @classmethod
    def of(cls, lo: torch.Tensor, hi: torch.Tensor) -> "Clamp":
        lo, hi = lo.reshape(-1, 1), hi.reshape(-1, 1)
        span = hi - lo
        constant = span <= 0
        return cls(lo, hi, torch.where(constant, 1.0, span), constant if bool(constant.any()) else None)


def scores(deltas: torch.Tensor, clamp: Clamp, out: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(clamp(|τ|, lo, hi), β) of a flat chunk (T, n) of task vectors; β written into ``out`` when given."""
    clamped = deltas.abs().clamp_(min=clamp.lo).clamp_(max=clamp.hi)  # as clamp(x, lo, hi): 7x faster apart
    intra = (clamped - clamp.lo).div_(clamp.span).square_().mul_(deltas.shape[0]).exp_()
    if clamp.constant is not None:  # min-max of a constant: 0, exp(0) = 1
        intra.masked_fill_(clamp.constant.expand_as(intra), 1.0)
    inter = torch.mul(deltas, deltas.sum(0, keepdim=True)).tanh_()
    return clamped, intra.mul_(inter) if out is None else torch.mul(intra, inter, out=out)


def balance_slices(flat: torch.Tensor) -> list[slice]:
    """The column chunks of flat task vectors (T, n) that their scores are made in: BALANCE_COLUMNS on a CPU."""
    return column_chunks(flat.shape[1], chunk_size(BALANCE_COLUMNS, flat.device))


def block_scores(deltas: torch.Tensor, clamp: Clamp) -> torch.Tensor:
    """β (T, n) of the task vectors (T, ...) flattened, made a balance slice at a time (one tensor, for the
    kernels to count in one call)."""
    flat = deltas.reshape(deltas.shape[0], -1)
    beta = torch.empty_like(flat)
    for sl in balance_slices(flat):
        scores(flat[:, sl], clamp, out=beta[:, sl])
    return beta


def balanced_chunks(deltas: torch.Tensor, clamp: Clamp) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """(columns, clamp(|τ|), β) of the task vectors (T, ...) flattened, a balance slice at a time."""
    flat = deltas.reshape(deltas.shape[0], -1)
    for sl in balance_slices(flat):
        yield (sl, *scores(flat[:, sl], clamp))


class SampledSelect(GlobalStat):
    """Order statistics of entries over all merged tensors (a StreamingSelect) that the sample of rows aims:
    one read where its windows hold the ranks, else two."""

    passes = 1  # a second where the sample misses or there is none
    rowwise = True  # order statistics of entries: blocks of rows may be observed separately
    samples = True

    def __init__(self, select: StreamingSelect) -> None:
        self._select = select
        self._sample = TaskVectorSample()

    def observe_sample(self, name: str, tensors: list[torch.Tensor], stride: int, rows: tuple[int, int]) -> None:
        self._sample.add(tensors, stride)

    def end_pass(self, pass_index: int) -> None:
        if pass_index == 0:
            self._select.end_coarse()
            self.passes = 1 if self._select.resolved else 2
        else:
            self._select.end_fine()

    def partials(self, pass_index: int) -> list[torch.Tensor]:
        return self._select.partials(pass_index)


class ClampBounds(SampledSelect):
    """lo_t and hi_t: the clamp quantiles of |τ_t| over all merged tensors, aimed at the sample's |τ_t|."""

    key = "pcb_clamp"

    def __init__(self, num_tasks: int, device: torch.device) -> None:
        super().__init__(StreamingSelect(num_tasks, clamp_ranks, device))
        self._device = torch.device(device)
        self._clamp: Clamp | None = None

    def end_sample(self) -> None:
        blocks = [b.abs_() for b in self._sample.take()]
        self._select.aim(blocks)
        if not blocks:
            self.passes = 2

    def observe(self, pass_index: int, name: str, deltas: torch.Tensor, weights: torch.Tensor) -> None:
        observe = self._select.observe_coarse if pass_index == 0 else self._select.observe_fine
        observe(deltas.abs())

    @property
    def stored_inputs(self) -> bool:  # type: ignore[override]
        """On a CPU the kernels count |τ_t| straight from the stored inputs (no task vectors made)."""
        return kernels.ENABLED and self._device.type == "cpu"

    def observe_stored(self, pass_index: int, name: str, tensors: list[torch.Tensor], weights: torch.Tensor
                       ) -> torch.Tensor | None:
        if kernels.applies(tensors, self._device):
            self._select.observe_stored(pass_index, tensors)
            return None  # no sums: non-finite inputs are refused by the other reads
        return self._observe_made(pass_index, name, tensors, weights, self._device)

    @property
    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        values = self._select.values
        assert values is not None, "statistics not finished"
        return values[:, 0], values[:, 1]

    @property
    def clamp(self) -> Clamp:
        if self._clamp is None:
            self._clamp = Clamp.of(*self.bounds)
        return self._clamp

    def summary(self) -> dict[str, Any]:
        lo, hi = self.bounds
        return {"clamp_low": lo.tolist(), "clamp_high": hi.tolist(), "entries_per_task": self._select.n}


class ScoreThreshold(SampledSelect):
    """q_t and M_t: the (1−ratio) quantile and the max of β_t over all merged tensors, read after the clamp
    bounds (β of an entry needs only that entry across the tasks), aimed at the sample's β once they are known."""

    key = "pcb_score"

    def __init__(self, clamp: ClampBounds, ratio: float, num_tasks: int, device: torch.device) -> None:
        super().__init__(StreamingSelect(num_tasks, lambda n: (score_rank(n, ratio),), device))
        self.after = clamp
        self.ratio = ratio
        self._bounds = clamp
        self._top = torch.full((num_tasks,), -math.inf, device=device)  # running max of β_t

    def end_sample(self) -> None:
        if not self._sample.blocks:
            self.passes = 2

    def _aim(self) -> None:
        """Once the clamp bounds are known (this statistic's first read has begun), the sample's β aims it; on
        every process alike, whether it observes a tensor or not (their partials must match)."""
        if self._sample.blocks:  # the sample is on the CPU, the bounds where the statistics run
            clamp = self._bounds.clamp
            blocks = self._sample.take()  # (T, m_b) each: scored as one (β is column by column), then split again
            scored = block_scores(torch.cat(blocks, 1).to(clamp.lo.device), clamp).cpu()
            self._select.aim(list(scored.split([b.shape[1] for b in blocks], 1)))

    def observe(self, pass_index: int, name: str, deltas: torch.Tensor, weights: torch.Tensor) -> None:
        self._aim()
        beta = block_scores(deltas, self._bounds.clamp)
        if pass_index == 0:
            self._select.observe_coarse(beta)
            if beta.shape[1]:
                torch.maximum(self._top, beta.amax(1), out=self._top)
        else:
            self._select.observe_fine(beta)

    def end_pass(self, pass_index: int) -> None:
        self._aim()
        super().end_pass(pass_index)

    def partials(self, pass_index: int) -> list[torch.Tensor]:
        self._aim()
        return super().partials(pass_index)

    def maxima(self, pass_index: int) -> list[torch.Tensor]:
        return [self._top] if pass_index == 0 else []

    @property
    def threshold_and_max(self) -> tuple[torch.Tensor, torch.Tensor]:
        values = self._select.values
        assert values is not None, "statistics not finished"
        top = self._top if self._select.n else torch.zeros_like(self._top)  # no entry: 0, as the select's
        return values[:, 0], top

    def summary(self) -> dict[str, Any]:
        q, top = self.threshold_and_max
        n = self._select.n
        above = [n - int(c) for c in self._select.at_or_below[:, 0].tolist()] if n else []
        return {
            "ratio": self.ratio,
            "score_threshold": q.tolist(),
            "score_max": top.tolist(),
            "kept_fraction": [a / n for a in above] if n else [],
        }


class Pcb(Method):
    name = "pcb"
    summary = "PCB-Merging: clamp, intra/inter-task competition scores, keep the top ratio; θ = θ0 + λ τ̄"
    params = (
        number("ratio", 0.1, "fraction of each task's entries that keep a non-zero weight", lo=0.0, hi=1.0,
               lo_open=True),
        LAMBDA,
    )
    scale_params = ("lambda",)

    def global_stats(self, params: dict[str, Any], num_tasks: int, device: torch.device) -> list[GlobalStat]:
        clamp = ClampBounds(num_tasks, device)
        return [clamp, ScoreThreshold(clamp, params["ratio"], num_tasks, device)]

    def rowwise(self, params: dict[str, Any]) -> bool:
        return True  # entry by entry, given the global statistics; the kept fraction is a mean

    def merge_parts(self, job: TensorJob, params: dict[str, Any]) -> TensorParts:
        clamp = job.stats["pcb_clamp"].clamp
        q, top = (x.reshape(-1, 1) for x in job.stats["pcb_score"].threshold_and_max)
        span = top - q
        divisor, constant = torch.where(span > 0, span, 1.0), (span <= 0)  # constant: M = q, every b is 0
        any_constant = bool(constant.any())
        w = job.weights.reshape(-1, 1)
        weighted = not bool((w == 1).all())  # w · b = b otherwise
        flat = job.deltas.reshape(job.deltas.shape[0], -1)
        out = torch.empty(flat.shape[1], dtype=flat.dtype, device=flat.device)
        kept = torch.zeros((), dtype=torch.float64, device=flat.device)
        for sl, clamped, beta in balanced_chunks(flat, clamp):
            b = beta.clamp_(min=q).sub_(q).div_(divisor)  # (max(β, q) − q)/(M − q)
            if any_constant:
                b.masked_fill_(constant.expand_as(b), 0.0)
            kept += b.sign().sum()  # b ≥ 0 (or NaN, whose sign is 0): the count of b > 0, exact below 2^24 a chunk
            wb = b.mul_(w) if weighted else b
            tilde = torch.sign(flat[:, sl]).mul_(clamped)  # τ̃ = sign(τ)·clamp(|τ|)
            out[sl] = tilde.mul_(wb).sum(0).div_(wb.sum(0).clamp_min_(1e-12))
        share = float(kept) / flat.numel() if flat.numel() else 0.0
        return TensorParts({"lambda": out.reshape(job.deltas.shape[1:])}, {"pcb_kept_fraction": share})

    def report(self, params: dict[str, Any], stats: dict[str, GlobalStat]) -> dict[str, Any]:
        return {k: s.summary() for k, s in stats.items()}
