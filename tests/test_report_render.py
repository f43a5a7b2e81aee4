"""`neuromerge report`: tables, per-layer figures (checked by hand), the PNG plot."""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from helpers import toy_family, write_recipe
from neuromerge_cli.cli import app
from neuromerge_cli.engine import MergeOptions, prepare, run_merge
from neuromerge_cli.errors import MergeError
from neuromerge_cli.recipe import load_recipe
from neuromerge_cli.report_render import by_layer, layer_of, load_report, metric, render


def _entry(shape, l2, delta, conflict=None, rank=None, par=None, orth=None, role="neuron"):
    e = {"role": role, "shape": shape, "task_l1": [x * 2 for x in l2], "task_l2": l2, "delta_norm": delta}
    if conflict is not None:
        e["sign_conflict"] = conflict
    if rank is not None:
        e["mean_orthogonal_rank"] = rank
    if par is not None:
        e["parallel_share"], e["orthogonal_share"] = par, orth
    return e


def neuro_report() -> dict:
    """A NeuroMerging-style report of a two-task Llama-like model, with hand-picked figures."""
    tensors = {
        "model.embed_tokens.weight": _entry([10, 4], [1.0, 1.0], 1.0, 0.1, 1.0, [0.5, 0.5], [0.5, 0.5]),
        "model.layers.0.self_attn.q_proj.weight": _entry([4, 4], [3.0, 4.0], 3.0, 0.25, 1.5, [0.2, 0.4], [0.8, 0.6]),
        "model.layers.0.mlp.up_proj.weight": _entry([8, 4], [1.0, 2.0], 4.0, 0.5, 2.0, [0.5, 0.1], [0.5, 0.9]),
        "model.layers.0.input_layernorm.weight": _entry([4], [0.5, 0.5], 0.0, 0.0, role="point"),
        "model.layers.10.mlp.down_proj.weight": _entry([4, 8], [1.0, 1.0], 0.5, 0.9, 1.0, [0.9, 0.9], [0.1, 0.1]),
        "model.layers.1.mlp.down_proj.weight": _entry([4, 8], [2.0, 2.0], 2.0, 0.125, 1.0, [0.3, 0.3], [0.7, 0.7]),
        "model.norm.weight": _entry([4], [0.1, 0.1], 0.1, 0.0, role="point"),
    }
    return {
        "neuromerge_version": "0.1.0", "method": "neuromerging",
        "parameters": {"density": 0.15, "lambda1": 0.0, "lambda2": "auto"},
        "inputs": {"base": {"reference": "org/base", "revision": "a" * 40, "source": "hub"},
                   "models": [{"reference": "org/task-a", "revision": "b" * 40, "source": "hub", "weight": 1.0},
                              {"reference": "./local/task-b", "revision": None, "source": "local", "weight": 0.5}]},
        "device": "cpu",
        "global": {"sigma": 0.4, "lambda1": 0.0, "lambda2": 1 / 0.6, "lambda2_auto": True},
        "tasks": [{"model": "org/task-a", "sigma": 0.4, "threshold": 0.01, "kept_fraction": 0.15},
                  {"model": "./local/task-b", "sigma": 0.3, "threshold": 0.02, "kept_fraction": 0.15}],
        "totals": {"tensors": 7, "parameters": 176, "merged_parameters": 176, "tied": {}, "bytes_in": 2112,
                   "bytes_out": 704, "shards": 1},
        "tensors": tensors,
        "timings": {"resolve_s": 0.1, "merge_s": 1.2}, "peak_memory": {"rss_bytes": 300 * 2**20},
    }


@pytest.fixture(scope="module")
def ties_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ties")
    base, tasks = toy_family(root, 2)
    recipe = load_recipe(write_recipe(root / "r.yaml", base, tasks, "ties", {"density": 0.5}))
    run_merge(prepare(recipe), MergeOptions(root / "out", "cpu"))
    return root / "out"


def test_layer_of() -> None:
    assert layer_of("model.layers.12.mlp.up_proj.weight") == ("model.layers", 12)
    assert layer_of("encoder.block.3.layer.0.SelfAttention.q.weight") == ("encoder.block", 3)
    assert layer_of("transformer.h.0.attn.c_attn.weight") == ("transformer.h", 0)
    assert layer_of("model.embed_tokens.weight") is None
    assert layer_of("lm_head.weight") is None


def test_metric_reads_scalars_lists_and_absence() -> None:
    e = neuro_report()["tensors"]["model.layers.0.self_attn.q_proj.weight"]
    assert metric(e, "sign_conflict") == 0.25
    assert metric(e, "rank") == 1.5
    assert metric(e, "parallel") == pytest.approx(0.3)
    assert metric({"delta_norm": 1.0}, "rank") is None


def test_by_layer_against_hand_computation() -> None:
    rows, outside = by_layer(neuro_report())
    assert outside == 2  # embeddings and the final norm
    assert [r.label for r in rows] == ["model.layers.0", "model.layers.1", "model.layers.10"]
    first = rows[0]
    assert first.tensors == 3
    # energy shares weighted by ‖τ_t‖²: weights 9, 16 (q_proj) and 1, 4 (up_proj)
    assert first.parallel == pytest.approx((0.2 * 9 + 0.4 * 16 + 0.5 * 1 + 0.1 * 4) / 30)
    assert first.orthogonal == pytest.approx((0.8 * 9 + 0.6 * 16 + 0.5 * 1 + 0.9 * 4) / 30)
    # sign conflict weighted by entries (16, 32, 4), rank by rows (4, 8; the norm has none)
    assert first.sign_conflict == pytest.approx((0.25 * 16 + 0.5 * 32 + 0.0 * 4) / 52)
    assert first.rank == pytest.approx((1.5 * 4 + 2.0 * 8) / 12)
    assert first.delta_norm == pytest.approx(5.0)
    assert first.task_norms == pytest.approx([math.sqrt(9 + 1 + 0.25), math.sqrt(16 + 4 + 0.25)])
    assert rows[2].parallel == pytest.approx(0.9) and rows[2].sign_conflict == pytest.approx(0.9)


def test_by_layer_without_neuron_figures(ties_folder: Path) -> None:
    rows, outside = by_layer(load_report(ties_folder))
    assert [r.label for r in rows] == ["layer.0", "layer.1"] and outside == 3  # embed, conv, norm
    assert all(r.parallel is None and r.rank is None for r in rows)
    assert all(r.sign_conflict is not None for r in rows)


def _render(report: dict, **kwargs) -> str:
    buffer = io.StringIO()
    render(report, Console(file=buffer, width=220, color_system=None), **kwargs)
    return buffer.getvalue()


def _section(text: str, title: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(("top ", "per layer", "(no "))), len(lines))
    return lines[start:end]


def test_render_tables() -> None:
    text = _render(neuro_report(), top=3, layers=True)
    assert "neuromerging (density=0.15, lambda1=0.0, lambda2=auto) on cpu" in text
    assert "σ = max σ_t = 0.4, λ1 = 0, λ2 = 1.667 (λ2 automatic: 1/(1 − σ))" in text
    inputs = _section(text, "inputs")
    assert any("org/base (base)" in line and "aaaaaaaaaaaa" in line for line in inputs)
    assert any("./local/task-b" in line and "local" in line and "0.3" in line and "0.02" in line for line in inputs)
    conflict = [line for line in _section(text, "top 3 tensors by sign conflict") if "model." in line]
    assert [line.split()[1] for line in conflict] == [
        "model.layers.10.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.self_attn.q_proj.weight"]
    assert "90.0%" in conflict[0]
    rank = [line.split()[1] for line in _section(text, "top 3 tensors by mean orthogonal rank") if "model." in line]
    assert rank[:2] == ["model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
    delta = [line.split()[1] for line in _section(text, "top 3 tensors by delta norm") if "model." in line]
    assert delta == ["model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight",
                     "model.layers.1.mlp.down_proj.weight"]
    layers = _section(text, "per layer")
    assert [line.split()[1] for line in layers if "model.layers" in line] == [
        "model.layers.0", "model.layers.1", "model.layers.10"]
    assert "2 merged tensor(s) outside numbered layers not shown" in text


def test_render_a_baseline_report(ties_folder: Path) -> None:
    report = load_report(ties_folder)
    text = _render(report)
    assert "top 6 tensors by sign conflict" in text
    assert "(no per-tensor mean orthogonal rank in this report)" in text
    assert "top 6 tensors by delta norm" in text  # the merged ones; copied tensors have no statistics
    assert "λ2" not in text


def test_load_report_errors(tmp_path: Path) -> None:
    with pytest.raises(MergeError, match="no such report"):
        load_report(tmp_path)
    (tmp_path / "merge_report.json").write_text("{")
    with pytest.raises(MergeError, match="not valid JSON"):
        load_report(tmp_path)
    (tmp_path / "merge_report.json").write_text('{"a": 1}')
    with pytest.raises(MergeError, match="not a merge report"):
        load_report(tmp_path / "merge_report.json")


def test_cli_report_and_plot(tmp_path: Path, ties_folder: Path) -> None:
    path = tmp_path / "merge_report.json"
    path.write_text(json.dumps(neuro_report()))
    png = tmp_path / "layers.png"
    result = CliRunner().invoke(app, ["report", str(path), "--top", "2", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert "top 2 tensors by sign conflict" in result.stdout
    assert f"wrote {png} (3 layers)" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    baseline_png = tmp_path / "ties.png"
    result = CliRunner().invoke(app, ["report", str(ties_folder), "--plot", str(baseline_png)])
    assert result.exit_code == 0, result.output
    assert baseline_png.read_bytes()[:4] == b"\x89PNG"


def test_plot_without_layers_is_an_error(tmp_path: Path) -> None:
    report = neuro_report()
    report["tensors"] = {"embed.weight": report["tensors"]["model.embed_tokens.weight"]}
    path = tmp_path / "merge_report.json"
    path.write_text(json.dumps(report))
    result = CliRunner().invoke(app, ["report", str(path), "--plot", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "no tensor names with a layer number" in result.stderr


def test_plot_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "merge_report.json"
    path.write_text(json.dumps(neuro_report()))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    result = CliRunner().invoke(app, ["report", str(path), "--plot", str(tmp_path / "x.png")])
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: --plot needs matplotlib: pip install 'neuromerge[plot]'"
    assert not (tmp_path / "x.png").exists()


def test_encoder_decoder_stacks_stay_apart(tmp_path: Path) -> None:
    report = neuro_report()
    entry = report["tensors"]["model.layers.1.mlp.down_proj.weight"]
    report["tensors"] = {f"{stack}.block.{i}.layer.0.SelfAttention.q.weight": entry
                         for stack in ("encoder", "decoder") for i in (1, 0)}
    rows, outside = by_layer(report)
    assert [r.label for r in rows] == ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"]
    assert outside == 0
    from neuromerge_cli.report_plot import plot_layers

    assert plot_layers(report, tmp_path / "t5.png") == 4
