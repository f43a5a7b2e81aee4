"""pcb: the streamed, exact PCB-Merging against a whole-vector reference written from the SPEC."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import fine_tune, run_engine_merge, toy_tensors, write_model

from neuromerge_cli import topk
from neuromerge_cli.errors import MergeError
from neuromerge_cli.methods import get_method
from neuromerge_cli.methods.pcb import clamp_ranks, score_rank


def reference_pcb(flat: torch.Tensor, ratio: float, lam: float, weights: torch.Tensor | None = None):
    """PCB over whole flattened task vectors (T, N) with full sorts, indices as in the authors' code."""
    num_tasks, n = flat.shape
    srt = flat.abs().sort(1).values
    lo = srt[:, int(n * 0.0001)].unsqueeze(1)
    hi = srt[:, int(n * (1 - 0.0001) - 1)].unsqueeze(1)
    clamped = torch.clamp(flat.abs(), lo, hi)
    lo_c, hi_c = clamped.min(1, keepdim=True).values, clamped.max(1, keepdim=True).values
    intra = torch.exp(num_tasks * ((clamped - lo_c) / (hi_c - lo_c)) ** 2)
    inter = torch.tanh(flat * flat.sum(0))
    beta = intra * inter
    q = beta.sort(1).values[:, int(n * (1 - ratio))].unsqueeze(1)
    raised = torch.maximum(beta, q)
    b = (raised - q) / (raised.max(1, keepdim=True).values - q)
    w = torch.ones(num_tasks, 1) if weights is None else weights.reshape(-1, 1)
    merged = (w * b * torch.sign(flat) * clamped).sum(0) / (w * b).sum(0).clamp_min(1e-12)
    return lam * merged, {"lo": lo.squeeze(1), "hi": hi.squeeze(1), "q": q.squeeze(1), "max": beta.max(1).values}


def family(root: Path, num_tasks: int, big: bool = False) -> tuple[Path, list[Path], dict, list[dict]]:
    """The toy model, or (big) one with over 10 000 merged entries so that the clamp cuts both ends."""
    base = toy_tensors(0)
    if big:
        g = torch.Generator().manual_seed(5)
        base = {"w": torch.randn(150, 80, generator=g), "b": torch.randn(80, generator=g),
                "ids": torch.arange(4)}
    write_model(root / "base", base)
    tasks = [fine_tune(base, t) for t in range(num_tasks)]
    if big:  # a few outliers, so that the clamp matters
        for t, sd in enumerate(tasks):
            sd["w"][t, :3] += torch.tensor([5.0, -7.0, 9.0])
    paths = [write_model(root / f"task{t}", sd) for t, sd in enumerate(tasks)]
    return root / "base", paths, base, tasks


def flat_deltas(base: dict, tasks: list[dict]) -> tuple[torch.Tensor, list[str]]:
    names = [n for n, t in base.items() if t.is_floating_point()]
    flat = torch.stack([torch.cat([(sd[n].float() - base[n].float()).flatten() for n in names]) for sd in tasks])
    return flat, names


def unflatten(vector: torch.Tensor, base: dict, names: list[str]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for n in names:
        k = base[n].numel()
        out[n] = vector[i:i + k].reshape(base[n].shape)
        i += k
    return out


@pytest.mark.parametrize("big,ratio,lam", [(False, 0.1, 1.0), (True, 0.1, 1.0), (True, 0.35, 0.7)])
def test_engine_matches_the_whole_vector_reference(tmp_path, monkeypatch, big, ratio, lam):
    monkeypatch.setattr(topk, "SELECT_CHUNK", 1000)  # chunk inside tensors too
    base_path, task_paths, base, tasks = family(tmp_path, 3, big)
    merged, report = run_engine_merge(tmp_path, base_path, task_paths, "pcb", {"ratio": ratio, "lambda": lam})
    flat, names = flat_deltas(base, tasks)
    expected, figures = reference_pcb(flat, ratio, lam)
    for name, delta in unflatten(expected, base, names).items():
        torch.testing.assert_close(merged[name], base[name] + delta, rtol=1e-5, atol=1e-6)
    clamp, score = report["global"]["pcb_clamp"], report["global"]["pcb_score"]
    assert torch.equal(torch.tensor(clamp["clamp_low"]), figures["lo"])
    assert torch.equal(torch.tensor(clamp["clamp_high"]), figures["hi"])
    torch.testing.assert_close(torch.tensor(score["score_threshold"]), figures["q"])
    torch.testing.assert_close(torch.tensor(score["score_max"]), figures["max"])
    assert all(abs(f - ratio) <= 1.5 / flat.shape[1] + 1e-9 for f in score["kept_fraction"])
    assert merged["ids" if big else "position_ids"].dtype == torch.int64


def test_a_sample_of_rows_aims_each_statistic_into_one_read(tmp_path, monkeypatch):
    from neuromerge_cli import engine

    g = torch.Generator().manual_seed(6)  # matrices only (a sample reads no vector), with outliers
    base = {"w": torch.randn(300, 80, generator=g), "v": torch.randn(64, 8, generator=g)}
    write_model(tmp_path / "base", base)
    tasks = [fine_tune(base, t) for t in range(3)]
    for t, sd in enumerate(tasks):
        sd["w"][t, :3] += torch.tensor([5.0, -7.0, 9.0])
    base_path, task_paths = tmp_path / "base", [write_model(tmp_path / f"task{t}", sd) for t, sd in enumerate(tasks)]
    monkeypatch.setattr(engine, "SAMPLE_SHARE", 1.0)  # every row: the windows hold the ranks
    aimed, aimed_report = run_engine_merge(tmp_path / "aimed", base_path, task_paths, "pcb", {"ratio": 0.2})
    monkeypatch.setattr(engine, "SAMPLE_SHARE", 0.0)  # no sample: two reads for each statistic
    plain, plain_report = run_engine_merge(tmp_path / "plain", base_path, task_paths, "pcb", {"ratio": 0.2})
    assert aimed_report["timings"]["statistics_reads"] == 2 and plain_report["timings"]["statistics_reads"] == 4
    assert aimed_report["global"] == plain_report["global"]
    assert all(torch.equal(aimed[name], plain[name]) for name in plain)
    flat, names = flat_deltas(base, tasks)
    expected, _ = reference_pcb(flat, 0.2, 1.0)
    for name, delta in unflatten(expected, base, names).items():
        torch.testing.assert_close(aimed[name], base[name] + delta, rtol=1e-5, atol=1e-6)


def test_task_order_and_common_weights_do_not_matter(tmp_path):
    base_path, task_paths, base, _ = family(tmp_path, 3)
    first, _ = run_engine_merge(tmp_path / "a", base_path, task_paths, "pcb")
    reversed_, _ = run_engine_merge(tmp_path / "b", base_path, task_paths[::-1], "pcb")
    doubled, _ = run_engine_merge(tmp_path / "c", base_path, task_paths, "pcb", weights=[2.0, 2.0, 2.0])
    for name in first:
        torch.testing.assert_close(reversed_[name], first[name], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(doubled[name], first[name], rtol=1e-6, atol=1e-7)


def test_weights_scale_each_tasks_share(tmp_path):
    base_path, task_paths, base, tasks = family(tmp_path, 3)
    weights = [1.0, 3.0, 0.5]
    merged, _ = run_engine_merge(tmp_path, base_path, task_paths, "pcb", weights=weights)
    flat, names = flat_deltas(base, tasks)
    expected, _ = reference_pcb(flat, 0.1, 1.0, torch.tensor(weights))
    for name, delta in unflatten(expected, base, names).items():
        torch.testing.assert_close(merged[name], base[name] + delta, rtol=1e-5, atol=1e-6)


def test_one_task_keeps_its_top_clamped_entries(tmp_path):
    """T = 1: β = exp(m²)·tanh(τ²) grows with |τ|, so PCB keeps the clamped τ on the top ratio of entries."""
    base_path, task_paths, base, tasks = family(tmp_path, 1, big=True)
    merged, _ = run_engine_merge(tmp_path, base_path, task_paths, "pcb", {"ratio": 0.2})
    flat, names = flat_deltas(base, tasks)
    mags = flat[0].abs()
    n = mags.numel()
    lo, hi = mags.sort().values[[k - 1 for k in clamp_ranks(n)]]
    cut = mags.sort().values[score_rank(n, 0.2) - 1]
    expected = torch.where(mags > cut, torch.sign(flat[0]) * mags.clamp(lo, hi), 0.0)
    for name, delta in unflatten(expected, base, names).items():
        torch.testing.assert_close(merged[name], base[name] + delta, rtol=1e-6, atol=1e-7)


def test_quantile_ranks_follow_the_authors_indices():
    for n in (1, 2, 3, 9999, 10000, 10001, 12080, 20000, 123457):
        lo, hi = clamp_ranks(n)
        assert lo == int(n * 0.0001) + 1
        assert hi == max(1, int(n * (1 - 0.0001) - 1) + 1)
        assert 1 <= lo <= hi <= n
    assert score_rank(10, 0.1) == 10  # int(10 · 0.9) = 9 → 0-based index 9
    assert score_rank(512, 0.1) == 461
    assert score_rank(7, 1.0) == 1
    # (1 − ratio)·N is computed exactly from the decimal given: 0.7·90 = 63, where the authors'
    # float arithmetic gives int(62.99999…) = 62, one rank lower.
    assert score_rank(90, 0.3) == 64


def test_ratio_out_of_range_is_a_merge_error():
    with pytest.raises(MergeError, match="parameters.ratio"):
        get_method("pcb").parse_params({"ratio": 0.0})
    assert get_method("pcb").parse_params({}) == {"ratio": 0.1, "lambda": 1.0}
