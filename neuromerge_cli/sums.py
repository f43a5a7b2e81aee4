"""Sums and norms of float32 tensors, the way a CPU does them fast and accurately."""

from __future__ import annotations

import torch

from . import kernels

SUM_CHUNK = 1 << 18  # entries of a row converted to float64 at a time (fewer, larger chunks: 14–28 % faster than 1 << 16)


def row_sums_f64(x: torch.Tensor) -> torch.Tensor:
    """Σ of each row of ``x`` (R, ...) flattened, in float64: shape (R,), on x's device.

    On a CPU, ``torch.sum(dtype=float64)`` of float32 is four to seven times slower than converting
    chunks to float64 and summing those; the chunks bound the extra memory to R · SUM_CHUNK doubles.
    """
    flat = x.reshape(x.shape[0], -1)
    if flat.device.type != "cpu":
        return flat.sum(1, dtype=torch.float64)
    acc = torch.zeros(flat.shape[0], dtype=torch.float64)
    for lo in range(0, flat.shape[1], SUM_CHUNK):
        acc += flat[:, lo:lo + SUM_CHUNK].to(torch.float64).sum(1)
    return acc


def sum_f64(x: torch.Tensor) -> float:
    """Σ of every entry of ``x``, in float64 (see row_sums_f64)."""
    return float(row_sums_f64(x.reshape(1, -1))[0]) if x.numel() else 0.0


SIGN_CHUNK = 1 << 24  # entries in {−1, 0, 1} whose float32 sum is exact: every partial sum is an integer below 2^24


def sign_total(signs: torch.Tensor) -> torch.Tensor:
    """Σ of a tensor of values in {−1, 0, 1}, exactly, as a 0-d float64 tensor on its device: float32
    sums of SIGN_CHUNK entries (exact in any order), added in float64. Ten times faster than a
    float64 sum on a CPU."""
    flat = signs.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=flat.device)
    for lo in range(0, flat.numel(), SIGN_CHUNK):
        total += flat[lo:lo + SIGN_CHUNK].sum(dtype=torch.float32).double()
    return total


def sum_and_capped_sum(x: torch.Tensor, cap: torch.Tensor) -> tuple[float, float]:
    """(Σ x, Σ min(x, cap)) over every entry of ``x``, in float64 (chunked as in row_sums_f64): both
    from one read, and a cap costs a third of a masked sum on a CPU; the fused kernel
    (kernels.capped_sums), where it applies, is one sweep."""
    flat = x.reshape(-1)
    if kernels.takes(flat):
        return kernels.capped_sums(flat, float(cap))
    if flat.device.type != "cpu":
        total = flat.sum(dtype=torch.float64)
        return float(total), float(flat.clamp_max(cap.to(flat.device)).sum(dtype=torch.float64))
    total = capped = torch.zeros((), dtype=torch.float64)
    limit = cap.to(torch.float64)
    for lo in range(0, flat.numel(), SUM_CHUNK):
        chunk = flat[lo:lo + SUM_CHUNK].to(torch.float64)
        total = total + chunk.sum()
        capped = capped + chunk.clamp_max_(limit).sum()
    return float(total), float(capped)


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """‖·‖₂ of each row of ``x`` (R, ...) flattened: shape (R,), float32, on x's device.

    One BLAS dot product per row reads it once and accumulates in blocks: on a CPU 1.5–3× faster
    than ``vector_norm`` and more accurate (measured on 1M float32 entries: 1.5e-6 relative error
    against float64, vector_norm 1.2e-5).
    """
    flat = x.reshape(x.shape[0], -1)
    return torch.stack([torch.dot(row, row) for row in flat]).sqrt() if flat.shape[0] else flat.new_zeros(0)
