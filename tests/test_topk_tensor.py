"""Per-tensor thresholds: the bracketed select equals a full sort's k-th largest."""

from __future__ import annotations

import pytest
import torch

from neuromerge_cli.topk import SELECT_SAMPLE, _kth_smallest, kept_count, tensor_thresholds


def sorted_threshold(mags: torch.Tensor, density: float) -> torch.Tensor:
    flat = mags.reshape(mags.shape[0], -1)
    k = kept_count(flat.shape[1], density)
    return flat.sort(dim=1, descending=True).values[:, k - 1]


@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.97])
def test_tensor_thresholds_match_a_full_sort(density: float) -> None:
    g = torch.Generator().manual_seed(1)
    n = 6 * SELECT_SAMPLE + 123  # above the bracketing size
    mags = torch.cat([torch.randn(1, n, generator=g).abs(),
                      torch.randint(0, 5, (1, n), generator=g).float(),  # heavy ties
                      torch.zeros(1, n)])  # all equal
    assert torch.equal(tensor_thresholds(mags, density), sorted_threshold(mags, density))


def test_kth_smallest_falls_back_when_the_sample_misleads() -> None:
    # the strided sample sees only the zeros; the k-th value sits among the ones in between
    n = 8 * SELECT_SAMPLE
    row = torch.zeros(n)
    row[1::2] = torch.arange(n // 2, dtype=torch.float32) + 1
    for q in (1, n // 2 + 7, n):
        assert float(_kth_smallest(row, q)) == float(row.sort().values[q - 1])
