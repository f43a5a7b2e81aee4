"""merge_report.json, the model card and the run summary, checked against direct computations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from helpers import GLOBAL_TIES_READS, hub_cache, load_output, merge, toy_family
from neuromerge_cli import kernels
from neuromerge_cli.report import summary_lines
from reference import Vectors, kth_largest_threshold, load_folder, trim

COMMITS = ["1" * 40, "2" * 40, "3" * 40]


@pytest.fixture(scope="module")
def hub_merge(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, Path, Path, list[Path]]:
    """A TIES merge of models resolved from an offline Hub cache laid out as huggingface_hub does."""
    from huggingface_hub import constants

    root = tmp_path_factory.mktemp("report")
    base, tasks = toy_family(root / "src", 2)
    cache = root / "hub"
    for folder, repo, commit in zip([base, *tasks], ["org/base", "org/ft-a", "org/ft-b"], COMMITS):
        hub_cache(cache, repo, folder, commit)
    recipe = {"base_model": "org/base", "models": ["org/ft-a", {"model": f"org/ft-b@{COMMITS[2]}", "weight": 2.0}],
              "method": "ties", "parameters": {"density": 0.25}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_CACHE", str(cache))
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        report = merge(recipe, root / "out")
    return report, recipe, root / "out", base, tasks


def test_report_file_is_the_returned_report(hub_merge: tuple) -> None:
    report, recipe, out, _, _ = hub_merge
    assert json.loads((out / "merge_report.json").read_text()) == json.loads(json.dumps(report))
    assert report["recipe"] == recipe
    assert report["method"] == "ties"
    assert report["parameters"] == {"density": 0.25, "lambda": 1.0, "mask_scope": "global", "merge_fn": "elect_mean"}


def test_inputs_record_location_and_revision(hub_merge: tuple) -> None:
    report, _, _, _, _ = hub_merge
    base = report["inputs"]["base"]
    assert base["source"] == "hub" and base["revision"] == COMMITS[0] and base["reference"] == "org/base"
    assert base["path"].endswith(f"models--org--base/snapshots/{COMMITS[0]}")
    models = report["inputs"]["models"]
    assert [m["revision"] for m in models] == COMMITS[1:]
    assert [m["weight"] for m in models] == [1.0, 2.0]
    assert all(Path(m["path"]).is_dir() for m in models)


def test_per_task_threshold_kept_fraction_and_sigma(hub_merge: tuple) -> None:
    report, _, _, base, tasks = hub_merge
    vec = Vectors(load_folder(base), [load_folder(t) for t in tasks])
    trimmed = trim(vec.tau, 0.25, None)
    assert [row["model"] for row in report["tasks"]] == ["org/ft-a", f"org/ft-b@{COMMITS[2]}"]
    for t, row in enumerate(report["tasks"]):
        mags = vec.tau[t].float().abs()  # the engine's float32 task vector
        assert row["threshold"] == kth_largest_threshold(mags, 0.25)
        assert row["kept_fraction"] == pytest.approx(float((mags >= row["threshold"]).double().mean()))
        assert row["kept_fraction"] == pytest.approx(0.25, abs=2 / vec.tau.shape[1])
        sigma = float((vec.tau[t] - trimmed[t]).abs().sum() / vec.tau[t].abs().sum())
        assert row["sigma"] == pytest.approx(sigma, rel=1e-5)
    assert report["global"]["trim"]["entries_per_task"] == vec.tau.shape[1] == report["totals"]["merged_parameters"]


def test_per_tensor_statistics(hub_merge: tuple) -> None:
    report, _, out, base, tasks = hub_merge
    theta0 = load_folder(base)
    thetas = [load_folder(t) for t in tasks]
    merged = load_output(out)
    thresholds = torch.tensor([row["threshold"] for row in report["tasks"]])
    assert set(report["tensors"]) == {n for n, t in theta0.items() if t.is_floating_point()}
    for name, row in report["tensors"].items():
        tau = torch.stack([t[name].float() - theta0[name].float() for t in thetas]).reshape(2, -1)
        assert row["role"] == ("neuron" if theta0[name].ndim >= 2 else "point")
        assert row["shape"] == list(theta0[name].shape)
        assert row["task_l1"] == pytest.approx(tau.abs().sum(1).tolist(), rel=1e-5)
        assert row["task_l2"] == pytest.approx(tau.norm(dim=1).tolist(), rel=1e-5)
        kept = torch.where(tau.abs() >= thresholds[:, None], tau, 0.0)
        conflict = ((kept > 0).any(0) & (kept < 0).any(0)).float().mean()
        assert row["sign_conflict"] == pytest.approx(float(conflict))
        assert row["delta_norm"] == pytest.approx(float((merged[name] - theta0[name]).norm()), rel=1e-5, abs=1e-7)


def test_timings_memory_and_totals(hub_merge: tuple) -> None:
    report, _, _, base, _ = hub_merge
    timings = report["timings"]
    for key in ("resolve_s", "index_and_plan_s", "statistics_s", "merge_s"):
        assert timings[key] >= 0
    assert timings["statistics_reads"] == GLOBAL_TIES_READS
    assert report["peak_memory"]["rss_bytes"] > 10 * 2**20
    totals = report["totals"]
    assert totals["tensors"] == 7 and totals["shards"] == 1 and totals["tied"] == {}
    assert totals["bytes_out"] == sum(t.numel() * t.element_size() for t in load_folder(base).values())
    assert totals["bytes_in"] == 3 * totals["bytes_out"]


def test_model_card_and_summary(hub_merge: tuple) -> None:
    report, recipe, out, _, _ = hub_merge
    card = (out / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["base_model"] == "org/base" and {"merge", "neuromerge", "ties"} <= set(meta["tags"])
    assert all(commit in body for commit in COMMITS)
    pinned = yaml.safe_load(body.split("```yaml\n")[1].split("```")[0])  # the recipe, pinned to the commits
    assert pinned["base_model"] == f"org/base@{COMMITS[0]}" and pinned["method"] == recipe["method"]
    lines = summary_lines(report)
    assert lines[0].startswith("method ties:") and "from 2 models on cpu" in lines[0]
    assert report["cpu_sweeps"] == kernels.cpu_sweeps()
    assert any("CPU sweeps: torch operations" in line for line in lines) == (not kernels.ENABLED)
    unbuilt = {**report, "cpu_sweeps": "torch operations: the C kernels are not built (...)"}
    assert "  CPU sweeps: torch operations: the C kernels are not built (...)" in summary_lines(unbuilt)
    assert any(line.strip().startswith("org/ft-a: sigma=") for line in lines)
    assert "most sign conflict" in "\n".join(lines)
