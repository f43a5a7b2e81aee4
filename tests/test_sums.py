"""Float64 sums of float32 tensors in chunks equal a float64 sum of the same numbers; row norms match
float64 norms."""

from __future__ import annotations

import math

import pytest
import torch

from neuromerge_cli import sums
from neuromerge_cli.sums import row_norms, row_sums_f64, sign_total, sum_and_capped_sum, sum_f64


@pytest.mark.parametrize("shape", [(3, 1000), (2, 5, 7), (1, 0), (4, 1)])
def test_row_sums_match_math_fsum(shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sums, "SUM_CHUNK", 64)  # several chunks, the last one short
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 1e3
    got = row_sums_f64(x)
    assert got.dtype == torch.float64 and got.shape == (shape[0],)
    for row, value in zip(x.reshape(shape[0], -1), got.tolist()):
        assert value == pytest.approx(math.fsum(row.tolist()), rel=1e-12, abs=1e-9)


def test_sums_of_signs_are_exact_beyond_float32_integers() -> None:
    x = torch.ones((1 << 24) + 3)  # 2^24 + 3 is not a float32 integer
    assert sum_f64(x) == (1 << 24) + 3
    assert sum_f64(torch.empty(0)) == 0.0


def test_sign_totals_are_exact_past_a_float32_sums_reach(monkeypatch: pytest.MonkeyPatch) -> None:
    signs = torch.ones((1 << 25) + 5)  # 2^25 + 5: beyond float32 integers, and two chunks and a bit
    signs[::7] = -1.0
    signs[3::11] = 0.0
    want = int((signs == 1).sum()) - int((signs == -1).sum())
    assert sign_total(signs).dtype == torch.float64 and float(sign_total(signs)) == want
    monkeypatch.setattr(sums, "SIGN_CHUNK", 1000)  # many short chunks: the same exact figure
    part = signs[5:].reshape(8, -1)[:, :9999]  # not contiguous
    assert float(sign_total(part)) == int(part.sum())
    assert float(sign_total(torch.empty(0))) == 0.0


@pytest.mark.parametrize("numel", [0, 1, 1000])
def test_sum_and_capped_sum_match_math_fsum(numel: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sums, "SUM_CHUNK", 64)
    x = torch.rand(numel, generator=torch.Generator().manual_seed(numel)).reshape(-1, 1) * 1e3
    cap = torch.tensor(371.5)
    total, capped = sum_and_capped_sum(x, cap)
    assert total == pytest.approx(math.fsum(x.reshape(-1).tolist()), rel=1e-12, abs=1e-9)
    assert capped == pytest.approx(math.fsum(min(v, 371.5) for v in x.reshape(-1).tolist()), rel=1e-12, abs=1e-9)


@pytest.mark.parametrize("shape", [(3, 100_000), (2, 5, 7), (1, 0)])
def test_row_norms_match_float64_norms(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 1e-2 + 1e-3
    got = row_norms(x)
    assert got.dtype == torch.float32 and got.shape == (shape[0],)
    for row, value in zip(x.reshape(shape[0], -1), got.tolist()):
        assert value == pytest.approx(math.sqrt(math.fsum(v * v for v in row.double().tolist())), rel=1e-5)
