"""Shared steps of the singular-vector methods (TSV-M, Iso-C, Iso-CTS): matrices, SVD, polar factor."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from ..errors import MergeError
from .elect import weighted_sum
from .params import choice, number

SVD_DTYPES = {"float32": torch.float32, "float64": torch.float64}
SVD_DTYPE = choice("svd_dtype", "float32", "precision of the SVDs (on the merge device)", tuple(SVD_DTYPES))
ALPHA = number("alpha", 1.0, "scale of the merged task vector: θ = θ0 + α·τ̄", lo=0.0)


def is_matrix(deltas: torch.Tensor) -> bool:
    """Whether the merged tensor is 2-D (deltas are (T, m, n)); the authors decompose only these."""
    return deltas.ndim == 3


@contextmanager
def svd_errors(name: str) -> Iterator[None]:
    """Turn a failed SVD (no convergence, e.g. on extreme values) into a MergeError naming the tensor."""
    try:
        yield
    except torch.linalg.LinAlgError as exc:
        raise MergeError(f"tensor '{name}': SVD failed ({str(exc).splitlines()[0]}); "
                         "try parameters.svd_dtype: float64") from None


def relative_weights(weights: torch.Tensor) -> torch.Tensor:
    """Recipe weights scaled to mean 1 (T·w_t / Σ w): all-equal weights change nothing."""
    return weights * (weights.numel() / weights.sum())


def average(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ w_t τ_t / Σ w_t: what the authors do with tensors they do not decompose."""
    return weighted_sum(deltas, weights) / weights.sum()


def top_svd(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k singular triplets (U_k m×k, S_k, Vh_k k×n), copied so the full factors can be freed,
    and which of them are defined (see ``defined``)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :k].clone(), s[:k].clone(), vh[:k].clone(), defined(s[:k], matrix.shape)


def defined(s: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Which singular values are large enough to define their singular vectors:
    s > max(m, n)·eps·s_max (numpy's matrix_rank tolerance). The others (every one of a zero matrix,
    e.g. a layer one task left frozen) come with arbitrary vectors, which the methods leave out."""
    if s.numel() == 0:
        return torch.ones(0, dtype=torch.bool, device=s.device)
    return s > max(shape) * torch.finfo(s.dtype).eps * s[0]


def polar(a: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor P Qᵀ of a = P Σ Qᵀ: the orthonormal matrix nearest to ``a``.

    For a tall m×K factor this is an m×K matrix with orthonormal columns (rows for a wide one).
    """
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh



class TaskMatrices(Sequence[torch.Tensor]):
    """w'_t·τ_t of one 2-D tensor in ``dtype`` (w' = relative weights), made one task at a time on
    access, so that at most one extra copy of a (possibly huge) matrix exists at once."""

    def __init__(self, deltas: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> None:
        self._deltas = deltas
        self._weights = relative_weights(weights).tolist()
        self._dtype = dtype

    def __len__(self) -> int:
        return self._deltas.shape[0]

    def __getitem__(self, t: int) -> torch.Tensor:  # type: ignore[override]
        if not 0 <= t < len(self):
            raise IndexError(t)
        return self._deltas[t].to(self._dtype) * self._weights[t]  # always a fresh copy

    @property
    def shape(self) -> torch.Size:
        """The shape of one task matrix."""
        return self._deltas.shape[1:]

    def total(self) -> torch.Tensor:
        """Σ_t w'_t τ_t."""
        out = self[0]
        for t in range(1, len(self)):
            out += self[t]
        return out
