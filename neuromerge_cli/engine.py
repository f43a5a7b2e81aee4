"""One merge: resolve → index → plan → statistics passes → merge pass → atomic finalize."""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from .checkpoints import Checkpoint, Source, open_checkpoint, resolve
from .chunking import chunk_size
from .errors import MergeError
from .figures import Figure, Norm, Ratio, figure_values
from .held_ties import HeldTies
from . import kernels
from .methods import Fusion, Method, NeuronFusion, TensorJob, get_method
from .methods.elect import DeferredMajority, merge_values, tie_candidates
from .memory import HeapGuard, peak_rss_bytes, reuse_freed_memory
from .methods.common import apply_drop, tensor_seed
from .methods.subspaces import as_rows, fused_neurons
from .plan import Plan, TensorPlan, make_plan
from .recipe import Recipe
from .stats import (GlobalStat, ModelMajorityStat, TensorMajorityStat, deferred_majority, float_task_vectors,
                    task_vectors_and_norms, trimmed)
from .sums import row_norms
from .distributed import World, shutdown, world_from_env
from .signals import deferred_signals, signals_as_exceptions
from .writer import AsyncWriter, ShardWriter, check_free_space, check_output_location, shared_folder

DEFAULT_SHARD_SIZE = 5 * 1024**3
PREFETCH = 2

Progress = Callable[[str, int, int, int, int], None]
"""(phase, tensors done, tensors in the pass, bytes read so far, bytes the pass reads): called with
done = 0 when a pass starts, then after every tensor."""


@dataclass
class MergeOptions:
    output: Path
    device: str = "auto"
    overwrite: bool = False
    shard_size: int = DEFAULT_SHARD_SIZE
    allow_nonfinite: bool = False
    progress: Progress | None = None


@dataclass
class Prepared:
    """A recipe whose inputs are resolved, indexed and planned (no weights read for merging)."""

    recipe: Recipe
    method: Method
    base: Checkpoint
    tasks: list[Checkpoint]
    plan: Plan
    timings: dict[str, float] = field(default_factory=dict)

    def read_bytes(self, name: str) -> int:
        """Bytes that reading tensor ``name`` from the base and every task takes."""
        return sum(ck.tensors[name].nbytes for ck in (self.base, *self.tasks))

    def piece_bytes(self, piece: "Piece") -> int:
        """Bytes that reading ``piece`` (a tensor or a block of its rows) from the base and every task takes."""
        return piece.share(self.read_bytes(piece.name), self.base.tensors[piece.name].shape)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MergeError("--device cuda: no CUDA device is available")
    if name not in ("cpu", "cuda"):
        raise MergeError(f"--device: expected auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def prepare(recipe: Recipe, shard_size: int = DEFAULT_SHARD_SIZE, read_weights: bool = True) -> Prepared:
    """Resolve and index every checkpoint and plan the output.

    ``read_weights=False`` (a dry run) downloads nothing and reads no weight: Hub ids must be in
    the cache, and tied weights stay unconfirmed (see plan.make_plan)."""
    t0 = time.perf_counter()
    sources: list[Source] = [resolve(r, read_weights) for r in (recipe.base_model, *(m.model for m in recipe.models))]
    t1 = time.perf_counter()
    base, *tasks = [open_checkpoint(s) for s in sources]
    plan = make_plan(base, tasks, recipe.torch_dtype, shard_size, compare_ties=read_weights)
    method = get_method(recipe.method)
    method.bind(recipe, plan)
    t2 = time.perf_counter()
    return Prepared(recipe, method, base, tasks, plan,
                    {"resolve_s": t1 - t0, "index_and_plan_s": t2 - t1})


# Rows of a large tensor are streamed in blocks of about this many entries (tunable, e.g. in tests).
BLOCK_ELEMENTS = 1 << 20  # entries per task of a block of rows (NEUROMERGE_BLOCK_ELEMENTS overrides it)
PREFETCH_BYTES = 1 << 28  # raw input bytes the reader may hold ahead of the consumer


@dataclass(frozen=True)
class Piece:
    """A tensor, or the block of its first-dimension rows [start, stop)."""

    name: str
    rows: tuple[int, int] | None = None

    @property
    def row(self) -> int:
        return 0 if self.rows is None else self.rows[0]

    def share(self, total: int, shape: tuple[int, ...]) -> int:
        """The part of ``total`` (the entries or bytes of the whole tensor of ``shape``) in this piece's rows."""
        if self.rows is None or not shape or not shape[0]:
            return total
        return total // shape[0] * (self.rows[1] - self.rows[0])


def setting(name: str, default: float, kind: Callable[[str], float] = float) -> float:
    """An engine setting from the environment variable ``name`` (for experiments and tests), else ``default``."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return kind(text)
    except ValueError:
        raise MergeError(f"{name}={text!r} is not {'an integer' if kind is int else 'a number'}") from None


def block_elements(device: torch.device) -> int:
    """Entries per task of a block of rows on ``device``: BLOCK_ELEMENTS on a CPU, larger on a GPU
    (chunking.chunk_size); NEUROMERGE_BLOCK_ELEMENTS sets it on any device."""
    if os.environ.get("NEUROMERGE_BLOCK_ELEMENTS"):
        return int(setting("NEUROMERGE_BLOCK_ELEMENTS", BLOCK_ELEMENTS, int))
    return chunk_size(BLOCK_ELEMENTS, device)


def pieces(plan: Plan, names: Iterable[str], rowwise: bool, block: int | None = None,
           device: torch.device = torch.device("cpu")) -> list[Piece]:
    """``names`` as work pieces: tensors above ``block`` (block_elements on ``device``) entries cut into blocks of
    rows when ``rowwise``. Point tensors (ndim <= 1) are never cut: their elections need the whole tensor."""
    block = block or block_elements(device)
    by_name = plan.by_name()
    out: list[Piece] = []
    for name in names:
        shape, numel = by_name[name].shape, by_name[name].numel
        if not rowwise or len(shape) < 2 or numel <= block or shape[0] < 2:
            out.append(Piece(name))
            continue
        step = max(1, block // max(1, numel // shape[0]))  # rows per block
        out.extend(Piece(name, (r, min(r + step, shape[0]))) for r in range(0, shape[0], step))
    return out


SAMPLE_SHARE = 1 / 64  # the most of the rows a sample reads (NEUROMERGE_SAMPLE_SHARE overrides it)
SAMPLE_ROWS = 8192  # and the most rows
SAMPLE_BLOCKS = 512  # blocks of consecutive rows it reads them in
SAMPLE_ENTRIES = 1 << 20  # entries per task of the sample a statistic keeps (every few, evenly spaced)


def sample_pieces(plan: Plan, names: Iterable[str]) -> list[Piece]:
    """A systematic sample of the rows of the matrices among ``names`` (tensors of 2 or more dimensions):
    SAMPLE_BLOCKS blocks of consecutive rows, evenly spaced over all their rows in order, SAMPLE_ROWS
    rows in all or SAMPLE_SHARE of them if that is fewer. Read before the statistics reads, for estimates
    that make them fewer (stats.TrimStat's ``sampled``)."""
    by_name = plan.by_name()
    matrices = [(name, by_name[name].shape[0]) for name in names
                if len(by_name[name].shape) >= 2 and by_name[name].shape[0] > 0]
    total = sum(rows for _, rows in matrices)
    wanted = min(SAMPLE_ROWS, int(total * setting("NEUROMERGE_SAMPLE_SHARE", SAMPLE_SHARE)))
    blocks = min(SAMPLE_BLOCKS, wanted)
    if not blocks:
        return []
    size = -(-wanted // blocks)  # rows per block
    out: list[Piece] = []
    first, b = 0, 0  # the first row of the current matrix in the concatenation; the next block
    for name, rows in matrices:
        while b < blocks and (start := (2 * b + 1) * total // (2 * blocks)) < first + rows:
            row = start - first
            out.append(Piece(name, (row, min(rows, row + size))))
            b += 1
        first += rows
    return out


def reads_whole(rowwise: bool, stats: list[GlobalStat]) -> bool:
    """Whether the merge read takes whole tensors and merges them in blocks of rows (``row_blocks``): a
    method that merges rows (``rowwise``) with a statistic of the merge read that needs whole tensors."""
    return rowwise and not all(s.rowwise for s in stats if s.in_merge_read)


def row_blocks(plan: Plan, piece: Piece, tensors: list[torch.Tensor], device: torch.device
               ) -> list[tuple[Piece, list[torch.Tensor]]]:
    """The inputs ``tensors`` of a whole tensor ``piece`` as the blocks of rows ``pieces`` cuts it into (views)."""
    return [(part, tensors if part.rows is None else [x[part.rows[0]:part.rows[1]] for x in tensors])
            for part in pieces(plan, [piece.name], True, device=device)]


class TensorLoader:
    """Reads base and task tensors ahead of the consumer on a background thread.

    Reads go straight into freshly allocated (page-locked, on CUDA) tensors, one ``preadv`` per
    input; the read-ahead is bounded by PREFETCH pieces and PREFETCH_BYTES bytes.
    """

    def __init__(self, prepared: Prepared, device: torch.device, allow_nonfinite: bool) -> None:
        self.prepared = prepared
        self.checkpoints = [prepared.base, *prepared.tasks]
        self.device = device
        self.allow_nonfinite = allow_nonfinite
        self.pin = device.type == "cuda"

    def _read(self, piece: Piece | str) -> list[torch.Tensor]:
        piece = Piece(piece) if isinstance(piece, str) else piece
        return [ck.read(piece.name, piece.rows, self.pin) for ck in self.checkpoints]

    def stream(self, names: Iterable[str | Piece]) -> Iterator[tuple[str, list[torch.Tensor]]]:
        """(name, [base, task_1..task_T] as stored, on the CPU), read ahead of use."""
        for piece, tensors in self.stream_pieces([Piece(n) if isinstance(n, str) else n for n in names]):
            yield piece.name, tensors

    def stream_pieces(self, items: list[Piece]) -> Iterator[tuple[Piece, list[torch.Tensor]]]:
        """(piece, [base, task_1..task_T] blocks as stored, on the CPU), read ahead of use; the heap is
        kept from creeping up through the pass (HeapGuard)."""
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="neuromerge-reader")
        try:
            ahead: deque[tuple[Piece, Future[list[torch.Tensor]], int]] = deque()
            nxt, held = 0, 0
            guard = HeapGuard()
            while ahead or nxt < len(items):
                while nxt < len(items):
                    piece, size = items[nxt], self.prepared.piece_bytes(items[nxt])
                    if ahead and (len(ahead) > PREFETCH or held + size > PREFETCH_BYTES):
                        break
                    with deferred_signals():  # the first submit starts the reader thread: started whole
                        future = pool.submit(self._read, piece.name if piece.rows is None else piece)
                    ahead.append((piece, future, size))
                    held += size
                    nxt += 1
                piece, future, size = ahead.popleft()
                tensors = future.result()
                held -= size
                guard.check(size)
                yield piece, tensors
        finally:
            with deferred_signals():  # the reader thread is joined whole
                pool.shutdown(wait=True, cancel_futures=True)

    def as_float(self, tensors: list[torch.Tensor], name: str = "", check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(θ0, τ stacked (T, ...)) in float32 on the compute device; refuses NaN/Inf inputs unless allowed."""
        base, deltas = float_task_vectors(tensors, self.device)
        if check and not self.allow_nonfinite and tensors[0].dtype.is_floating_point:
            self.check_finite(tensors, deltas.view(deltas.shape[0], -1).sum(1), name)
        return base, deltas

    def with_norms(self, tensors: list[torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """as_float, with ‖τ_t‖₁ and ‖τ_t‖₂ of each task (stats.task_vectors_and_norms)."""
        base, deltas, l1, l2 = task_vectors_and_norms(tensors, self.device)
        if not self.allow_nonfinite:
            self.check_finite(tensors, l1, name)
        return base, deltas, l1, l2

    def check_finite(self, tensors: list[torch.Tensor], delta_sums: torch.Tensor, name: str) -> None:
        """Any NaN/Inf in an input makes its task vector's sum non-finite; only then look closer."""
        if all(math.isfinite(x) for x in delta_sums.tolist()):
            return
        for ck, t in zip(self.checkpoints, tensors):
            if not bool(torch.isfinite(t).all()):
                raise MergeError(f"{ck.source.reference}: tensor '{name}' contains NaN or Inf "
                                 "(use --allow-nonfinite to merge anyway)")


class PassProgress:
    """Reports one pass over tensors to a Progress callback: announced on creation, then tick(name)."""

    def __init__(self, progress: Progress | None, phase: str, prepared: Prepared, names: list[str]) -> None:
        self.progress, self.phase, self.prepared, self.total = progress, phase, prepared, len(names)
        self.done = self.bytes_done = 0
        self.bytes_total = sum(prepared.read_bytes(n) for n in names)
        if progress:
            progress(phase, 0, self.total, 0, self.bytes_total)

    def tick(self, name: str) -> None:
        self.done += 1
        self.bytes_done += self.prepared.read_bytes(name)
        if self.progress:
            self.progress(self.phase, self.done, self.total, self.bytes_done, self.bytes_total)


def schedule(stats: list[GlobalStat]) -> list[list[tuple[GlobalStat, int]]]:
    """Group statistics passes into reads of the model: [(stat, its pass index)] per read, in the order
    of ``stats``. A statistic starts once ``after`` has finished."""
    start: dict[int, int] = {}
    for s in stats:
        if s.after is not None and id(s.after) not in start:
            raise ValueError(f"statistic {s.key!r} is listed before the one it runs after")
        start[id(s)] = start[id(s.after)] + s.after.passes if s.after is not None else 0
    total = max((start[id(s)] + s.passes for s in stats), default=0)
    return [[(s, g - start[id(s)]) for s in stats if start[id(s)] <= g < start[id(s)] + s.passes]
            for g in range(total)]


def _last(plan_by_name: dict[str, TensorPlan], piece: Piece) -> bool:
    """Whether ``piece`` ends its tensor (progress counts tensors, not blocks)."""
    return piece.rows is None or piece.rows[1] == plan_by_name[piece.name].shape[0]


def observe_piece(active: list[tuple[GlobalStat, int]], piece: Piece, tensors: list[torch.Tensor],
                  loader: TensorLoader, weights: torch.Tensor) -> None:
    """Every statistic of ``active`` (with its pass index) observes ``piece``'s inputs ``tensors`` (as stored)."""
    deltas = None
    for stat, p in active:
        if stat.stored_inputs:
            sums = stat.observe_stored(p, piece.name, tensors, weights)
            if sums is not None and not loader.allow_nonfinite:
                loader.check_finite(tensors, sums, piece.name)
            continue
        if deltas is None:
            _, deltas = loader.as_float(tensors, piece.name)
        stat.observe(p, piece.name, deltas, weights)


def run_statistics(prepared: Prepared, stats: list[GlobalStat], loader: TensorLoader,
                   weights: torch.Tensor, progress: Progress | None, world: World | None = None) -> int:
    """Run every statistics pass; returns the number of reads of the model it took.

    Across several processes each rank observes its share of the tensors and the partial sums (and
    maxima) are combined before ``end_pass``; a statistic without partial sums sees every tensor on
    every rank. The reads are planned again after each one, as a
    statistic may ask for another pass in ``end_pass``.
    """
    world = world or World()
    plan = prepared.plan
    by_name = plan.by_name()
    names = [t.name for t in plan.merged]
    sampled = [stat for stat in stats if stat.samples]
    if sampled:  # every rank reads the whole sample: the same estimates everywhere
        work = sample_pieces(plan, names)
        entries = sum(p.share(by_name[p.name].numel, by_name[p.name].shape) for p in work)
        stride = max(1, entries // SAMPLE_ENTRIES)
        for piece, tensors in loader.stream_pieces(work):
            assert piece.rows is not None
            for stat in sampled:
                stat.observe_sample(piece.name, tensors, stride, piece.rows)
        for stat in sampled:
            stat.end_sample()
    g = 0
    while g < len(passes := schedule(stats)):
        active = passes[g]
        split = not world.alone and all(stat.partials(p) is not None for stat, p in active)
        mine = world.share(names, [by_name[n].nbytes for n in names]) if split else names
        work = pieces(plan, mine, all(stat.rowwise for stat, _ in active), device=loader.device)
        meter = PassProgress(progress, f"statistics pass {g + 1}/{len(passes)}", prepared, mine)
        for piece, tensors in loader.stream_pieces(work):
            observe_piece(active, piece, tensors, loader, weights)
            if _last(by_name, piece):
                meter.tick(piece.name)
        if split:  # the partial sums (and maxima) as they stand at the end of the pass
            world.all_reduce_([t for stat, p in active for t in stat.partials(p) or ()])
            world.all_reduce_([t for stat, p in active for t in stat.maxima(p)], maximum=True)
        for stat, p in active:
            stat.end_pass(p)
        g += 1
    return g


class TensorFigures:
    """The report's figures of one tensor, added up over its blocks of rows."""

    def __init__(self, t: TensorPlan, num_tasks: int, variants: int = 1) -> None:
        self.t = t
        self.l1 = [0.0] * num_tasks  # Python floats: per block, a few list operations instead of torch calls
        self.l2sq = [0.0] * num_tasks
        self.delta_sq = [0.0] * variants
        self.extra: dict[str, float] = {}
        self.summed: dict[str, Figure] = {}
        self.other: dict[str, Any] = {}
        self.n = 0

    def add(self, l1: torch.Tensor, l2: torch.Tensor, delta_norms: list[float], extra: dict[str, Any],
            numel: int) -> None:
        self.l1 = [a + b for a, b in zip(self.l1, l1.tolist())]
        self.l2sq = [a + b * b for a, b in zip(self.l2sq, l2.tolist())]
        self.delta_sq = [a + b ** 2 for a, b in zip(self.delta_sq, delta_norms)]
        for k, v in extra.items():
            if isinstance(v, (Ratio, Norm)):
                self.summed[k] = self.summed[k] + v if k in self.summed else v
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                self.extra[k] = self.extra.get(k, 0.0) + float(v) * numel  # a mean over entries
            else:
                self.other[k] = v
        self.n += numel

    def report(self, variant: int = 0) -> dict[str, Any]:
        n = max(self.n, 1)
        return {
            "role": self.t.role, "shape": list(self.t.shape),
            "task_l1": [float(x) for x in self.l1],
            "task_l2": [float(x) ** 0.5 for x in self.l2sq],
            "delta_norm": self.delta_sq[variant] ** 0.5,
            **{k: v / n for k, v in self.extra.items()}, **figure_values(self.summed), **self.other,
        }


def merge_piece(method: Method, params: dict[str, Any], job: TensorJob,
                scales: list[dict[str, float]] | None) -> tuple[list[torch.Tensor], list[float], dict[str, Any]]:
    """θ = θ0 + delta in float32 for one piece and each variant's scales (None: no scale parameters),
    ‖delta‖ of each, and the method's stats.

    The last output is built in job.base's memory; a single scaled part is scaled in place, so one
    output needs no separate delta tensor.
    """
    if scales is None:
        result = method.merge(job, params)
        deltas, stats = [result.delta], result.stats
    else:
        split = method.merge_parts(job, params)
        stats = split.stats
        if len(scales) == 1 and len(split.parts) == 1:
            (key, delta), = split.parts.items()
            if scales[0][key] != 1.0:
                shared = delta.untyped_storage().data_ptr() == job.base.untyped_storage().data_ptr()
                delta = delta * scales[0][key] if shared else delta.mul_(scales[0][key])
            deltas = [delta]
        else:
            deltas = [split.combine(s) for s in scales]
    norms = [float(row_norms(d.reshape(1, -1))[0]) for d in deltas]
    outs = [job.base + d for d in deltas[:-1]] + [job.base.add_(deltas[-1])]
    return outs, norms, stats


def fused_merge(loader: TensorLoader, piece: Piece, tensors: list[torch.Tensor], t: TensorPlan, fusion: Fusion,
                weights: torch.Tensor, stats: dict[str, GlobalStat], fig: TensorFigures
                ) -> tuple[torch.Tensor, DeferredMajority | None] | None:
    """``piece`` (of the planned tensor ``t``) merged in one fused sweep over its stored inputs
    (kernels.merge), its figures added to ``fig``: the output in the planned dtype, and the
    DeferredMajority of a block whose election guessed its tensor's majority sign at a tie (see
    mended_ties); None where the kernel does not take the piece.

    An election with its group's majority sign uses a guess (a block: the sign of its group's blocks so
    far; a whole tensor of a per-tensor group: +1) and keeps its ties; a whole tensor's own are mended at
    once, the others' once their group's last block is merged."""
    own = fusion.merge_fn.startswith("elect") and fusion.majority is None
    stat = deferred_majority(stats, piece.rows is not None) if own else None
    dtype = t.dtype
    if dtype not in kernels.KINDS or not kernels.applies(tensors, loader.device) or \
            (stat is not None and not (isinstance(stat, TensorMajorityStat) and stat.deferred)):
        return None
    guess = stat.guess(piece.name) if isinstance(stat, TensorMajorityStat) else 1.0
    rows = None if piece.rows is None else t.shape[0]
    drops = None if fusion.drop is None else fusion.drop(len(tensors) - 1, tensors[0].shape, piece.row, rows)
    r = kernels.merge(tensors, weights, fusion.merge_fn, dtype, fusion.scale, fusion.thresholds,
                      guess if fusion.majority is None else fusion.majority, fusion.conflicts, ties=own,
                      drops=drops, keep=fusion.keep)
    if not loader.allow_nonfinite:
        loader.check_finite(tensors, r.l1, piece.name)
    n = r.out.numel()
    fig.add(r.l1, r.l2, [r.delta_norm], {"sign_conflict": r.conflicts / n if n else 0.0} if fusion.conflicts else {}, n)
    if not own:
        return r.out, None
    if stat is not None:
        stat.add(piece.name, float(r.sign_total))
    if not r.ties.numel():
        return r.out, None
    deferred = DeferredMajority(lambda _: None, guess, None, "lambda")  # (the block's signs are added above)
    base, columns = float_task_vectors([x.reshape(-1)[r.ties] for x in tensors], loader.device)
    if drops is not None:
        columns = apply_drop(columns, [m.reshape(-1)[r.ties] for m in drops], fusion.keep)
    if fusion.thresholds is not None:
        columns = trimmed(columns, fusion.thresholds)
    deferred.keep(r.ties, base, tie_candidates(columns, lambda x, m: merge_values(x, weights, fusion.merge_fn,
                                                                                   majority=m)))
    if stat is not None:
        return r.out, deferred
    majority = float((r.sign_total > 0) - (r.sign_total < 0))  # a whole tensor's, known now
    mended = mended_ties(deferred, majority, [fusion.scale], dtype, fig.delta_sq)
    if mended is not None:
        r.out.view(-1)[r.ties] = mended[0]
    return r.out, None


def fused_neuron_merge(loader: TensorLoader, piece: Piece, tensors: list[torch.Tensor], t: TensorPlan,
                       fusion: NeuronFusion, weights: torch.Tensor, stats: dict[str, GlobalStat], fig: TensorFigures
                       ) -> tuple[torch.Tensor, None] | None:
    """``piece`` (of the planned neuron tensor ``t``) merged as NeuroMerging's fused sweeps (one read for
    the rows' Gram matrices, one for the output; methods.subspaces.fused_neurons), its figures added to
    ``fig``: the output in the planned dtype; None where the kernels do not take the piece."""
    rows = [as_rows(x) for x in tensors]
    stat = stats.get("tensor_majority") if piece.rows is not None else None
    on_demand = stat is None or (isinstance(stat, TensorMajorityStat) and not stat.deferred)
    if t.dtype not in kernels.KINDS or not kernels.neuron_applies(rows, loader.device) or not on_demand:
        return None
    gram, l1, l2 = kernels.neuron_gram(rows, fusion.thresholds)
    if not loader.allow_nonfinite:
        loader.check_finite(tensors, l1, piece.name)
    # a block's parallel election falls back to its tensor's majority sign, read on demand (as TensorJob's)
    majority = None if stat is None else (lambda: stat.majority(piece.name, weights))
    r, extra = fused_neurons(rows, gram, fusion, weights, majority, t.dtype)
    fig.add(l1, l2, [r.delta_norm], extra, r.out.numel())
    return r.out.reshape(tensors[0].shape), None


def mended_ties(deferred: DeferredMajority, majority: float, scales: list[float], dtype: torch.dtype,
                delta_sq: list[float]) -> list[torch.Tensor] | None:
    """A block's outputs at its tied positions (θ0 + scale · merged in ``dtype``, one per variant of
    ``scales``) once its tensor's ``majority`` sign is known, or None when its election guessed right;
    the variants' squared delta norms ``delta_sq`` are mended in place. The same float32 operations as
    merge_piece: the bytes of an election that knew the sign."""
    if deferred.guess == majority:
        return None
    assert deferred.base_values is not None
    new, old = deferred.candidates[majority], deferred.candidates[deferred.guess]
    outs = []
    for k, scale in enumerate(scales):
        delta = new * scale
        outs.append((deferred.base_values + delta).to(dtype))
        delta_sq[k] += float(delta.double().square().sum() - (old * scale).double().square().sum())
    return outs


@dataclass(frozen=True)
class Variant:
    """One output of a merge pass: a folder, and values for the method's scale parameters.

    Several variants share one read of the inputs and one computation of each tensor's parts; only
    the final scaled sum differs (a λ sweep).
    """

    output: Path
    scales: dict[str, Any] = field(default_factory=dict)


def _variant_recipe(recipe: Recipe, scales: dict[str, Any]) -> Recipe:
    if not scales:
        return recipe
    raw = {**recipe.raw, "parameters": {**(recipe.raw.get("parameters") or {}), **scales}}
    return replace(recipe, params={**recipe.params, **scales}, raw=raw)


def run_merge(prepared: Prepared, options: MergeOptions) -> dict[str, Any]:
    """Merge and publish ``options.output``; returns the report that was written with it.

    Under a launcher (torchrun, accelerate launch: WORLD_SIZE > 1) every rank merges and writes its
    share of the tensors into the same files; rank 0 writes the metadata and publishes.
    """
    return merge_variants(prepared, options, [Variant(options.output)])[0]


def merge_variants(prepared: Prepared, options: MergeOptions, targets: list[Variant]) -> list[dict[str, Any]]:
    """Merge once and publish one folder per variant; returns the report written with each."""
    method = prepared.method
    if any(v.scales for v in targets):
        extra = sorted({k for v in targets for k in v.scales} - set(method.scale_params))
        if extra:
            raise MergeError(f"parameters.{extra[0]}: not a scale parameter of method '{method.name}' "
                             f"(scale parameters: {', '.join(method.scale_params) or 'none'})")
    kind = pick_device(options.device).type
    world = world_from_env(kind)
    try:
        return _run(prepared, options, targets, world, world.device(kind))
    finally:
        shutdown(world)


def _run(prepared: Prepared, options: MergeOptions, targets: list[Variant], world: World,
         device: torch.device) -> list[dict[str, Any]]:
    from .report import build_report, metadata_bytes, write_metadata

    recipe, method, plan = prepared.recipe, prepared.method, prepared.plan
    reuse_freed_memory()
    recipes = [_variant_recipe(recipe, v.scales) for v in targets]
    inputs = [prepared.base.path] + [t.path for t in prepared.tasks]
    for v in targets:
        check_output_location(v.output, inputs, options.overwrite)
    check_free_space([v.output for v in targets], plan.bytes_out + metadata_bytes(prepared.base.path))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    weights = torch.tensor([m.weight for m in recipe.models], dtype=torch.float32, device=device)
    loader = TensorLoader(prepared, device, options.allow_nonfinite)
    timings = dict(prepared.timings)
    figures: dict[str, TensorFigures] = {}
    by_name = plan.by_name()
    num_tasks = len(recipe.models)
    with contextlib.ExitStack() as stack:
        stack.enter_context(signals_as_exceptions())
        folders = [stack.enter_context(shared_folder(v.output, options.overwrite, world)) for v in targets]
        t0 = time.perf_counter()
        stats = method.global_stats(recipe.params, num_tasks, device)
        for s in stats:
            if isinstance(s, TensorMajorityStat):
                s.reader, s.shapes = lambda name, rows: loader._read(Piece(name, rows)), {t.name: t.shape for t in plan.merged}
        reads = run_statistics(prepared, stats, loader, weights, options.progress, world)
        by_key = {s.key: s for s in stats}
        scales = [method.scales(r.params, by_key) for r in recipes] if method.scale_params else None
        t1 = time.perf_counter()
        aliases: dict[str, list[str]] = {}
        for t in plan.tensors:
            if t.alias_of:
                aliases.setdefault(t.alias_of, []).append(t.name)
        names = [t.name for t in plan.tensors if t.alias_of is None]
        mine = world.share(names, [by_name[n].nbytes * (num_tasks + 1) for n in names])
        owned = set(mine) | {a for n in mine for a in aliases.get(n, ())}
        writers = [ShardWriter(f, plan, create=True, owns=owned) for f in folders] if world.rank == 0 else []
        world.barrier()  # the files exist, with their headers, before any other rank opens them
        if world.rank != 0:
            writers = [ShardWriter(f, plan, create=False, owns=owned) for f in folders]
        background = AsyncWriter()
        try:
            rowwise = method.rowwise(recipe.params)
            observed = [(s, 0) for s in stats if s.in_merge_read]
            whole = reads_whole(rowwise, stats)
            to_merge = [n for n in mine if by_name[n].role != "copy"]
            work = pieces(plan, to_merge, rowwise and not whole, device=device) + \
                [Piece(n) for n in mine if by_name[n].role == "copy"]
            meter = PassProgress(options.progress, "merge", prepared, mine)

            def emit(piece: Piece, outs: list[torch.Tensor]) -> None:
                for writer, out in zip(writers, outs):
                    event = None
                    if out.device.type == "cuda":
                        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
                        host.copy_(out, non_blocking=True)
                        event = torch.cuda.Event()
                        event.record()
                        out = host
                    background.write(writer, [piece.name, *aliases.get(piece.name, ())], out, piece.row, event)

            def settle(name: str, blocks: list[tuple[int, DeferredMajority]], stat: TensorMajorityStat) -> None:
                """Mend, in the files, the written blocks (first row, election) of tensor ``name`` whose
                elections guessed their group's majority sign (``stat``'s) wrong (a short write each)."""
                majority = stat.sign(name)
                for row, deferred in blocks:
                    values = mended_ties(deferred, majority, [v[deferred.part] for v in scales] if scales else [1.0],
                                         by_name[name].dtype, figures[name].delta_sq)
                    if values is None:
                        continue
                    stat.blocks_mended += 1
                    positions = deferred.positions.cpu()
                    for writer, v in zip(writers, values):
                        background.patch(writer, [name, *aliases.get(name, ())], row, positions, v.cpu())

            fusing = len(targets) == 1  # a sweep's variants share their parts: the torch path computes them once
            waiting: list[tuple[int, DeferredMajority]] = []  # blocks of the current tensor elected with a guess
            model = by_key.get("majority")  # the model's majority sign, found in this read
            held = stack.enter_context(contextlib.closing(HeldTies(folders[0]))) \
                if isinstance(model, ModelMajorityStat) else None

            def hold(name: str, row: int, deferred: DeferredMajority) -> None:
                if held is not None:
                    held.add(name, row, deferred)
                else:
                    waiting.append((row, deferred))
            for read, inputs in loader.stream_pieces(work):
                merging = by_name[read.name].role != "copy"
                if observed and merging:
                    observe_piece(observed, read, inputs, loader, weights)
                parts = row_blocks(plan, read, inputs, device) if whole and merging else [(read, inputs)]
                for piece, tensors in parts:
                    t = by_name[piece.name]
                    if t.role == "copy":
                        outs = [tensors[0]] * len(targets)
                    elif fusing and (fusion := method.fusion(recipe.params, scales[0] if scales else None, by_key,
                                                             piece.name, t.role)) and \
                            (fused := (fused_neuron_merge if isinstance(fusion, NeuronFusion) else fused_merge)(
                                loader, piece, tensors, t, fusion, weights, by_key,
                                figures.setdefault(piece.name, TensorFigures(t, num_tasks)))):
                        outs = [fused[0]]
                        if fused[1] is not None:
                            hold(piece.name, piece.row, fused[1])
                    else:
                        base, deltas, l1, l2 = loader.with_norms(tensors, piece.name)
                        job = TensorJob(piece.name, t.role, base, deltas, weights, by_key,
                                        tensor_seed(recipe.params.get("seed", 0), piece.name, -1),
                                        piece.row, None if piece.rows is None else t.shape[0])
                        merged, delta_norms, extra = merge_piece(method, recipe.params, job, scales)
                        fig = figures.setdefault(piece.name, TensorFigures(t, num_tasks, len(targets)))
                        fig.add(l1, l2, delta_norms, extra, deltas[0].numel())
                        outs = [m.to(t.dtype) for m in merged]
                        if job.deferred is not None and job.deferred.positions is not None:
                            hold(piece.name, piece.row, job.deferred)
                    emit(piece, outs)
                    if _last(by_name, piece):
                        if waiting:
                            tensor = by_key["tensor_majority"]
                            assert isinstance(tensor, TensorMajorityStat)
                            settle(piece.name, waiting, tensor)
                            waiting.clear()
                        meter.tick(piece.name)
            if held is not None:  # every rank's blocks are in: the model's sign, then the mending
                assert isinstance(model, ModelMajorityStat)
                if not world.alone:
                    world.all_reduce_([model.total])
                for name, blocks in held.by_tensor():
                    settle(name, blocks, model)
            background.drain()
            for writer in writers:
                writer.close(write_index=world.rank == 0)
        except BaseException:
            background.stop()
            for writer in writers:
                writer.abort()
            raise
        world.barrier()  # every rank's tensors are in the files
        if observed:  # the statistics of the merge read, as after a statistics pass
            if not world.alone:
                world.all_reduce_([x for stat, _ in observed for x in stat.partials(0) or ()])
            for stat, _ in observed:
                stat.end_pass(0)
        t2 = time.perf_counter()
        timings.update({"statistics_s": t1 - t0, "merge_s": t2 - t1, "statistics_reads": reads})
        peak = {"rss_bytes": peak_rss_bytes()}
        if device.type == "cuda":
            peak["cuda_bytes"] = torch.cuda.max_memory_allocated(device)
        gathered = world.all_gather(({n: [f.report(k) for k in range(len(targets))] for n, f in figures.items()}, peak))
        rows: dict[str, list[dict[str, Any]]] = {}
        for part, _ in gathered:
            rows.update(part)
        order = [t.name for t in plan.tensors if t.name in rows]
        peak = {k: max(p[k] for _, p in gathered) for k in peak}
        if world.size > 1:
            peak["processes"] = world.size
        where = str(device) if world.alone else f"{device.type} x {world.size} processes"
        reports = []
        for k, (folder, r) in enumerate(zip(folders, recipes)):
            variant = replace(prepared, recipe=r)
            report = build_report(variant, method.report(r.params, by_key), {n: rows[n][k] for n in order},
                                  where, timings, peak)
            if world.rank == 0:
                write_metadata(folder, variant, report)
            reports.append(report)
    world.barrier()  # rank 0 has published the folders
    return reports
