"""A slow NeuroMerging reference written from SPEC.md: a Python loop over rows, one float64 SVD per row,
trimming by sorting the concatenated task vector. Shared by the NeuroMerging and subspace tests."""

from __future__ import annotations

import math

import torch

RANK_RTOL = 1e-6  # the kernel's documented conventions (methods/subspaces.py)
COORD_RTOL = 1e-9
TIE_RTOL = 1e-9


def role(t: torch.Tensor) -> str:
    return "neuron" if t.ndim >= 2 else "point"


def trim(deltas: dict[str, torch.Tensor], density: float, scope: str) -> tuple[dict[str, torch.Tensor], list[float]]:
    """m_t∘τ_t for every tensor (T, ...) in float64, and σ_t, by sorting |τ_t| (globally or per tensor)."""
    names = list(deltas)
    num_tasks = next(iter(deltas.values())).shape[0]
    masked = {n: deltas[n].double().clone() for n in names}
    groups = [names] if scope == "global" else [[n] for n in names]
    removed = [0.0] * num_tasks
    total = [0.0] * num_tasks
    for group in groups:
        for t in range(num_tasks):
            flat = torch.cat([deltas[n][t].double().reshape(-1) for n in group])
            n = flat.numel()
            k = n if density >= 1 else max(1, math.floor(density * n))
            thr = torch.sort(flat.abs(), descending=True).values[k - 1]
            for name in group:
                x = masked[name][t]
                removed[t] += float(x.abs()[x.abs() < thr].sum())
                total[t] += float(x.abs().sum())
                x[x.abs() < thr] = 0.0
    sigma = [r / s if s > 0 else 0.0 for r, s in zip(removed, total)]
    return masked, sigma


def psi(x: list[float], w: list[float], merge_fn: str, fallback: float, tie: bool = False) -> float:
    """ψ of one coordinate's values x_t with weights w_t; ``fallback`` is the sign used on a tie
    (Σ w_t x_t = 0, or ``tie``)."""
    wx = [wi * xi for wi, xi in zip(w, x)]
    if merge_fn == "sum":
        return sum(wx)
    if merge_fn == "mean":
        return sum(wx) / sum(w)
    total = sum(wx)
    s = fallback if tie else ((total > 0) - (total < 0) or fallback)
    agree = [i for i, v in enumerate(wx) if v != 0 and ((v > 0) - (v < 0)) == s]
    if not agree:
        return 0.0
    summed = sum(wx[i] for i in agree)
    return summed if merge_fn == "elect_sum" else summed / sum(w[i] for i in agree)


def majority(values: torch.Tensor, w: list[float]) -> float:
    """sign(Σ over coordinates of sign(Σ_t w_t x_t)) of values (T, n)."""
    s = torch.sign((values * torch.tensor(w, dtype=values.dtype).unsqueeze(1)).sum(0))
    return float(torch.sign(s.sum()))


def point_merge(tau: torch.Tensor, w: list[float], merge_fn: str) -> torch.Tensor:
    flat = tau.reshape(tau.shape[0], -1)
    m = majority(flat, w)
    out = [psi(flat[:, i].tolist(), w, merge_fn, m) for i in range(flat.shape[1])]
    return torch.tensor(out, dtype=torch.float64).reshape(tau.shape[1:])


def decompose_row(w0: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a (T,), P (T, d)) for one base row and its task rows."""
    n2 = float(w0 @ w0)
    a = tau @ w0 / n2 if n2 > 0 else torch.zeros(tau.shape[0], dtype=torch.float64)
    return a, tau - a.unsqueeze(1) * w0


def orthogonal_row(p: torch.Tensor, w: list[float], merge_fn: str, flips: torch.Tensor | None = None,
                   scale: float | None = None) -> torch.Tensor:
    """V ψ(C) for one row's orthogonal parts P (T, d) via its SVD; ``flips`` (±1) flips basis vectors.

    ``scale``: ‖τ‖_F of the row's task rows (default ‖P‖_F): singular values <= RANK_RTOL·scale are
    negligible.
    """
    scale = float(p.norm()) if scale is None else scale
    _, s, vh = torch.linalg.svd(p, full_matrices=False)
    v = vh[s > RANK_RTOL * scale].T
    if flips is not None:
        v = v * flips[: v.shape[1]]
    return merge_in_basis(p, v, w, merge_fn, scale)


def merge_in_basis(p: torch.Tensor, v: torch.Tensor, w: list[float], merge_fn: str, scale: float,
                   tie_sign: str = "zero") -> torch.Tensor:
    """V ψ(P V) for an orthonormal basis V (d, r) of P's rows.

    Coordinates <= COORD_RTOL·scale count as zero; a direction whose weighted coordinates sum to
    (TIE_RTOL-relatively) zero is a tie: 0 there (``tie_sign='majority'``: the SPEC's literal
    fallback, the majority sign over the neuron's directions, exact ties only).
    """
    c = p @ v
    c[c.abs() <= COORD_RTOL * scale] = 0.0
    weighted = c * torch.tensor(w, dtype=c.dtype).unsqueeze(1)
    ties = weighted.sum(0).abs() <= TIE_RTOL * weighted.abs().sum(0)
    signs = torch.where(ties, 0.0, torch.sign(weighted.sum(0)))
    fallback = float(torch.sign(signs.sum())) if tie_sign == "majority" else 0.0
    cbar = [psi(c[:, j].tolist(), w, merge_fn, fallback, tie=bool(ties[j])) for j in range(c.shape[1])]
    return v @ torch.tensor(cbar, dtype=torch.float64)


def neuron_merge(base: torch.Tensor, tau: torch.Tensor, w: list[float], merge_fn: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(τ̄∥, τ̄⊥) of one neuron tensor: base (out, ...), masked τ (T, out, ...), float64."""
    shape = base.shape
    w0s = base.double().reshape(shape[0], -1)
    taus = tau.double().reshape(tau.shape[0], shape[0], -1)
    coeffs = torch.stack([decompose_row(w0s[k], taus[:, k])[0] for k in range(shape[0])], dim=1)  # (T, out)
    m = majority(coeffs, w)
    parallel = torch.stack([psi(coeffs[:, k].tolist(), w, merge_fn, m) * w0s[k] for k in range(shape[0])])
    orthogonal = torch.stack([orthogonal_row(decompose_row(w0s[k], taus[:, k])[1], w, merge_fn,
                                             scale=float(taus[:, k].norm()))
                              for k in range(shape[0])])
    return parallel.reshape(shape), orthogonal.reshape(shape)


def neuromerging(base: dict[str, torch.Tensor], tasks: list[dict[str, torch.Tensor]], density: float = 0.15,
                 scope: str = "global", lambda1: float = 0.0, lambda2: float | str = "auto",
                 merge_fn: str = "elect_mean", lambda_point: float | None = None,
                 weights: list[float] | None = None) -> tuple[dict[str, torch.Tensor], list[float], float]:
    """Merged task vectors (float64) of every float tensor, σ_t and the λ2 used."""
    w = weights or [1.0] * len(tasks)
    names = [n for n, t in base.items() if t.is_floating_point()]
    # τ_t is computed in float32 whatever the storage dtype (SPEC), then the reference works in float64
    deltas = {n: torch.stack([tk[n].float() - base[n].float() for tk in tasks]).double() for n in names}
    masked, sigma = trim(deltas, density, scope)
    lam2 = 1.0 / (1.0 - max(sigma)) if lambda2 == "auto" else lambda2
    lamp = lam2 if lambda_point is None else lambda_point
    out = {}
    for n in names:
        if role(base[n]) == "point":
            out[n] = lamp * point_merge(masked[n], w, merge_fn)
        else:
            par, orth = neuron_merge(base[n].double(), masked[n], w, merge_fn)
            out[n] = lambda1 * par + lam2 * orth
    return out, sigma, lam2
