"""Parameters and steps that several methods share, defined once."""

from __future__ import annotations

import hashlib

import torch

from .elect import MERGE_FUNCTIONS
from .params import Param, choice, integer, number

LAMBDA = number("lambda", 1.0, "scale of the merged task vector: θ = θ0 + λ·τ̄", lo=0.0)
MASK_SCOPE = choice("mask_scope", "global", "one trim threshold per task over the whole model, or per tensor",
                    ("global", "tensor"))
MERGE_FN = choice("merge_fn", "elect_mean", "merge function ψ over the tasks", MERGE_FUNCTIONS)
SEED = integer("seed", 0, "seed of the random drop (recorded in the report)")


def density(default: float, help: str = "fraction of each task vector kept") -> Param:
    return number("density", default, help, lo=0.0, hi=1.0, lo_open=True)


def tensor_seed(seed: int, name: str, task: int) -> int:
    """A seed for one task's tensor, independent of tensor order, device and process split."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{task}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def dare_drop(deltas: torch.Tensor, keep: float, seed: int, name: str) -> torch.Tensor:
    """DARE: keep each entry with probability ``keep`` and rescale by 1/keep (seeded per tensor).

    The random numbers are drawn on the CPU so that every device gives the same bits.
    """
    if keep >= 1.0:
        return deltas
    out = torch.empty_like(deltas)
    for t in range(deltas.shape[0]):
        gen = torch.Generator().manual_seed(tensor_seed(seed, name, t))
        kept = (torch.rand(deltas.shape[1:], generator=gen) < keep).to(deltas.device)
        out[t] = torch.where(kept, deltas[t] / keep, 0.0)
    return out
