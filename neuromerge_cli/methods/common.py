"""Parameters and steps that several methods share, defined once."""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict

import torch

from .. import kernels
from .elect import MERGE_FUNCTIONS
from .params import Param, choice, integer, number

LAMBDA = number("lambda", 1.0, "scale of the merged task vector: θ = θ0 + λ·τ̄", lo=0.0)
MASK_SCOPE = choice("mask_scope", "global", "one trim threshold per task over the whole model, or per tensor",
                    ("global", "tensor"))
MERGE_FN = choice("merge_fn", "elect_mean", "merge function ψ over the tasks", MERGE_FUNCTIONS)
SEED = integer("seed", 0, "seed of the random drop (recorded in the report)")


def density(default: float, help: str = "fraction of each task vector kept") -> Param:
    return number("density", default, help, lo=0.0, hi=1.0, lo_open=True)


def _seed_of(*fields: object) -> int:
    """The first 8 bytes (little endian, 63 bits) of sha256 of the fields joined by NUL bytes."""
    digest = hashlib.sha256("\0".join(str(f) for f in fields).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def tensor_seed(seed: int, name: str, task: int) -> int:
    """A seed for one task's tensor, independent of tensor order, device and process split."""
    return _seed_of(seed, name, task)


DARE_CHUNK = 1 << 20  # entries of a flattened task vector drawn from one generator
# The chunks used last (at most DRAWN_CHUNKS_KEPT of them, 1 MiB each): a block of rows that ends
# inside a chunk leaves the rest of it to the next block, and a tensor's majority sign, found by
# reading all its blocks while its first ones are merged, draws the chunks the later blocks need.
# 16 holds a 4M-entry tensor's chunks for three tasks: on a 0.47B dare_ties merge 1677 draws instead
# of 2325 (3.4 vs 5.7 s of drawing); 64 cost more than they saved (heap fragmentation, +0.3 GB RSS).
_DRAWN: OrderedDict[tuple[int, str, int, int, int, int], torch.Tensor] = OrderedDict()
DRAWN_CHUNKS_KEPT = 16


def chunk_seed(seed: int, name: str, task: int, chunk: int) -> int:
    """The generator seed of one chunk of DARE draws: like tensor_seed, with the chunk index appended."""
    return _seed_of(seed, name, task, chunk)


def chunk_keep(seed: int, length: int, bound: int) -> torch.Tensor:
    """Keep mask of one chunk: ``length`` 32-bit draws from numpy's PCG64 seeded with ``seed`` (its raw
    64-bit outputs, each split into its low then its high 32 bits), True where a draw is < ``bound``."""
    import numpy as np

    if bound >= 1 << 32:
        return torch.ones(length, dtype=torch.bool)
    generator = np.random.PCG64(seed)
    if kernels.ENABLED:  # the same draws, over threads (numpy draws one after another)
        state = generator.state["state"]
        return kernels.dare_keep(state["state"], state["inc"], length, bound)
    raw = generator.random_raw((length + 1) // 2).astype("<u8", copy=False)
    return torch.from_numpy(np.less(raw.view("<u4")[:length], bound))


def dare_keep(keep: float, seed: int, name: str, task: int, start: int, stop: int, numel: int) -> torch.Tensor:
    """DARE's keep mask (bool, on the CPU) for entries [start, stop) of the flattened task vector
    ``task`` of tensor ``name`` (``numel`` entries).

    Chunk c (entries [c·DARE_CHUNK, (c+1)·DARE_CHUNK) ∩ [0, numel)) is drawn whole by chunk_keep from
    chunk_seed(seed, name, task, c): an entry is kept where its draw is < ⌈keep·2^32⌉. A block of rows
    draws only the chunks it overlaps, so the mask depends neither on how a tensor is cut into blocks,
    nor on the device or the process. (numpy's generators are several times faster than torch.rand.)
    """
    if stop <= start:
        return torch.empty(0, dtype=torch.bool)
    bound = math.ceil(keep * 2.0 ** 32)
    parts = []
    for c in range(start // DARE_CHUNK, (stop - 1) // DARE_CHUNK + 1):
        lo = c * DARE_CHUNK
        key = (seed, name, task, c, DARE_CHUNK, bound)
        kept = _DRAWN.get(key)
        if kept is None or kept.numel() != min(DARE_CHUNK, numel - lo):  # numel: another tensor of that name
            kept = _DRAWN[key] = chunk_keep(chunk_seed(seed, name, task, c), min(DARE_CHUNK, numel - lo), bound)
            while len(_DRAWN) > DRAWN_CHUNKS_KEPT:
                _DRAWN.popitem(last=False)
        else:
            _DRAWN.move_to_end(key)
        parts.append(kept[max(start, lo) - lo: min(stop, lo + DARE_CHUNK) - lo])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def dare_masks(keep: float, seed: int, name: str, num_tasks: int, shape: torch.Size, row: int = 0,
               rows: int | None = None) -> list[torch.Tensor]:
    """DARE's keep masks (bool, flat, see dare_keep) of the ``num_tasks`` task vectors of tensor ``name``,
    or of the block of its first-dimension rows starting at ``row`` of a tensor with ``rows`` rows
    (default: the block is the whole tensor); ``shape``: the block's."""
    block = shape.numel()
    per_row = block // max(1, shape[0]) if len(shape) else 1
    start = row * per_row
    return [dare_keep(keep, seed, name, t, start, start + block, block if rows is None else rows * per_row)
            for t in range(num_tasks)]


def dare_drop(deltas: torch.Tensor, keep: float, seed: int, name: str, row: int = 0,
              rows: int | None = None) -> torch.Tensor:
    """DARE: keep each entry with probability ``keep`` and rescale by 1/keep.

    ``deltas`` (T, ...) may be the block of a tensor's first-dimension rows starting at ``row`` of a
    tensor with ``rows`` rows (default: the block is the whole tensor); see dare_masks.
    """
    if keep >= 1.0:
        return deltas
    return apply_drop(deltas, dare_masks(keep, seed, name, deltas.shape[0], deltas.shape[1:], row, rows), keep)


def apply_drop(deltas: torch.Tensor, masks: list[torch.Tensor], keep: float) -> torch.Tensor:
    """(m_t · τ_t) / keep of task vectors ``deltas`` (T, ...) and their keep masks ``masks`` (bool, flat), as
    a new tensor."""
    out = torch.empty_like(deltas)
    for t, kept in enumerate(masks):
        # 1.0 where kept, times τ / keep; + 0.0 turns the −0.0 of a dropped negative entry into +0.0.
        # On a CPU this is several times faster than where() over the boolean mask (and copying the
        # mask's bytes as uint8 six times faster than copying it as bool).
        out[t].copy_(kept.view(torch.uint8).reshape(deltas.shape[1:])).mul_(deltas[t]).div_(keep).add_(0.0)
    return out
