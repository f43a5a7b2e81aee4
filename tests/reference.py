"""A slow, independent reference of the baseline merges, written from SPEC.md.

Whole checkpoints are loaded with safetensors' own reader, every float tensor's task vector is
flattened and concatenated (in float64), and the methods are computed on those long vectors with
plain torch. Nothing here reuses neuromerge's trim, election or merge code; the only shared
convention is DARE's documented random stream (``dare_keep_mask``), which is part of the
reproducibility contract.
"""

from __future__ import annotations

import hashlib
from fractions import Fraction
import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder (single or sharded safetensors)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(load_file(str(folder / shard)))
        return out
    return load_file(str(folder / "model.safetensors"))


class Vectors:
    """The float tensors of base + tasks as concatenated float64 vectors, and back."""

    def __init__(self, base: dict[str, torch.Tensor], tasks: list[dict[str, torch.Tensor]]) -> None:
        self.base = base
        self.names = sorted(n for n, t in base.items() if t.is_floating_point())
        self.shapes = [base[n].shape for n in self.names]
        self.sizes = [base[n].numel() for n in self.names]
        self.theta0 = torch.cat([base[n].double().reshape(-1) for n in self.names])
        self.thetas = torch.stack([torch.cat([t[n].double().reshape(-1) for n in self.names]) for t in tasks])
        self.tau = self.thetas - self.theta0

    def segments(self) -> list[slice]:
        out, start = [], 0
        for size in self.sizes:
            out.append(slice(start, start + size))
            start += size
        return out

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A full state dict: merged float tensors from ``flat``, everything else from the base."""
        out = dict(self.base)
        for name, seg, shape in zip(self.names, self.segments(), self.shapes):
            out[name] = flat[seg].reshape(shape)
        return out


def kept_k(n: int, density: float) -> int:
    """SPEC: k = max(1, ⌊d·N⌋) for the decimal d as written, N when d >= 1."""
    return n if density >= 1 else max(1, int(Fraction(str(density)) * n))


def kth_largest_threshold(mags: torch.Tensor, density: float) -> float:
    """The k-th largest |τ|."""
    return float(torch.sort(mags, descending=True).values[kept_k(mags.numel(), density) - 1])


def trim(tau: torch.Tensor, density: float, segments: list[slice] | None) -> torch.Tensor:
    """Keep |τ| >= the k-th largest, over the whole vector (segments None) or per segment."""
    out = torch.zeros_like(tau)
    for t in range(tau.shape[0]):
        for seg in segments or [slice(None)]:
            x = tau[t, seg]
            if x.numel() == 0:
                continue
            thr = kth_largest_threshold(x.abs(), density)
            out[t, seg] = torch.where(x.abs() >= thr, x, torch.zeros_like(x))
    return out


def elect_merge(x: torch.Tensor, w: torch.Tensor, merge_fn: str, segments: list[slice] | None) -> torch.Tensor:
    """ψ over the task axis, one coordinate at a time, with the majority-sign fallback per group.

    Weighted values v_t = w_t x_t are elected (mergekit's convention); ``elect_mean`` is the
    weight-normalised mean of the agreeing values, Σ v_t / Σ w_t (the plain mean when w = 1).
    """
    v = x * w[:, None]
    if merge_fn == "sum":
        return v.sum(0)
    if merge_fn == "mean":
        return v.sum(0) / w.sum()
    out = torch.zeros(x.shape[1], dtype=x.dtype)
    for seg in segments or [slice(None)]:
        vs = v[:, seg]
        signs = torch.sign(vs.sum(0))
        majority = torch.sign(signs.sum())  # over the group: the whole vector, or one tensor
        signs = torch.where(signs == 0, majority, signs)
        agree = (vs != 0) & (torch.sign(vs) == signs)
        total = torch.where(agree, vs, torch.zeros_like(vs)).sum(0)
        if merge_fn == "elect_mean":
            count = torch.where(agree, w[:, None].expand_as(vs), torch.zeros_like(vs)).sum(0)
            total = torch.where(count > 0, total / count.clamp_min(1e-300), torch.zeros_like(total))
        out[seg] = total
    return out


def tensor_seed(seed: int, name: str, task: int) -> int:
    """The documented per-tensor DARE seed: sha256 of 'seed\\0name\\0task', first 8 bytes LE, 63 bits."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{task}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


DARE_CHUNK = 1 << 20


def dare_keep_mask(shape: torch.Size, keep: float, seed: int, name: str, task: int) -> torch.Tensor:
    """The documented DARE draw: the flattened tensor in chunks of 2^20 entries, chunk c drawn whole as
    uniform 32-bit integers by numpy's Generator(PCG64(s)), s from sha256('seed\0name\0task\0c') (first
    8 bytes LE, 63 bits); an entry is kept where its draw is < ceil(keep * 2^32)."""
    n = torch.Size(shape).numel()
    bound = math.ceil(keep * 2 ** 32)
    draws = []
    for c in range(0, -(-n // DARE_CHUNK)):
        digest = hashlib.sha256(f"{seed}\0{name}\0{task}\0{c}".encode()).digest()
        gen = np.random.Generator(np.random.PCG64(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)))
        size = min(DARE_CHUNK, n - c * DARE_CHUNK)
        draws.append(torch.from_numpy(gen.integers(0, 2 ** 32, size=size, dtype=np.uint32).astype(np.int64)))
    return (torch.cat(draws) if draws else torch.empty(0, dtype=torch.int64)).reshape(shape) < bound


def reference_merge(base_dir: Path, task_dirs: list[Path], method: str, params: dict | None = None,
                    weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    """The merged state dict (float64 for merged tensors) that SPEC.md prescribes."""
    p = {"density": 0.2, "lambda": 1.0, "mask_scope": "global", "merge_fn": "elect_mean", "seed": 0, **(params or {})}
    vec = Vectors(load_folder(base_dir), [load_folder(d) for d in task_dirs])
    w = torch.tensor(weights or [1.0] * len(task_dirs), dtype=torch.float64)
    tau = vec.tau
    if method == "linear":
        return vec.unflatten((vec.thetas * w[:, None]).sum(0) / w.sum())
    if method == "task_arithmetic":
        return vec.unflatten(vec.theta0 + p["lambda"] * (tau * w[:, None]).sum(0))
    if method in ("dare_linear", "dare_ties"):
        keep = p["density"]
        dropped = tau.clone()
        if keep < 1:
            for t in range(tau.shape[0]):
                mask = torch.cat([dare_keep_mask(shape, keep, p["seed"], name, t).reshape(-1)
                                  for name, shape in zip(vec.names, vec.shapes)])
                dropped[t] = torch.where(mask, tau[t] / keep, torch.zeros_like(tau[t]))
        if method == "dare_linear":
            return vec.unflatten(vec.theta0 + p["lambda"] * (dropped * w[:, None]).sum(0))
        merged = elect_merge(dropped, w, p["merge_fn"], vec.segments())
        return vec.unflatten(vec.theta0 + p["lambda"] * merged)
    if method == "ties":
        per_tensor = vec.segments() if p["mask_scope"] == "tensor" else None
        trimmed = trim(tau, p["density"], per_tensor)
        merged = elect_merge(trimmed, w, p["merge_fn"], per_tensor)
        return vec.unflatten(vec.theta0 + p["lambda"] * merged)
    raise ValueError(method)
