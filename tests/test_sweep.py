"""neuromerge sweep: grid parsing, one merge pass per non-scale combination, scores, best point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import toy_family, write_recipe

from neuromerge_cli.engine import MergeOptions, prepare, run_merge
from neuromerge_cli.errors import MergeError
from neuromerge_cli.methods.ties import Ties
from neuromerge_cli.recipe import load_recipe
from neuromerge_cli.sweep import parse_grid, run_sweep

# Scores a merged folder by the first element of one tensor: distinct for every point of the grids below.
SCORER = Path(__file__).with_name("score_first_element.py")
EVAL = f"{sys.executable} {SCORER} {{output}}"


@pytest.fixture
def family(tmp_path: Path) -> tuple[Path, list[Path]]:
    return toy_family(tmp_path / "models", num_tasks=3)


def test_parse_grid_ranges_are_inclusive_and_lists_keep_yaml_types() -> None:
    grid = parse_grid(["lambda2=0.8:5.0:0.2", "density=0.05,0.1", "lambda=auto,1"])
    assert len(grid["lambda2"]) == 22
    assert grid["lambda2"][0] == 0.8 and grid["lambda2"][-1] == 5.0 and grid["lambda2"][1] == 1.0
    assert grid["density"] == [0.05, 0.1]
    assert grid["lambda"] == ["auto", 1]


@pytest.mark.parametrize("spec", ["lambda", "lambda=", "=1", "lambda=1:0:0.1", "lambda=0:1:0", "lambda=a:b:c"])
def test_parse_grid_rejects_malformed_specs(spec: str) -> None:
    with pytest.raises(MergeError, match="--grid"):
        parse_grid([spec])


def test_parse_grid_rejects_a_name_given_twice() -> None:
    with pytest.raises(MergeError, match="given twice"):
        parse_grid(["lambda=1", "lambda=2"])


def test_sweep_shares_one_merge_per_density_and_matches_separate_runs(
        tmp_path: Path, family: tuple[Path, list[Path]], monkeypatch: pytest.MonkeyPatch) -> None:
    base, tasks = family
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", base, tasks, "ties", {"density": 0.3}))
    prepared = prepare(recipe)
    calls: list[str] = []
    original = Ties.merge_parts

    def counting(self: Ties, job, params):  # type: ignore[no-untyped-def]
        calls.append(job.name)
        return original(self, job, params)

    monkeypatch.setattr(Ties, "merge_parts", counting)
    grid = {"lambda": [0.5, 1.0, 1.5], "density": [0.2, 0.4]}
    result = run_sweep(prepared, grid, EVAL, tmp_path / "sweep", MergeOptions(tmp_path / "sweep"), keep="all")
    merged_tensors = len(prepared.plan.merged)
    assert result.merges == 2
    assert len(calls) == 2 * merged_tensors  # not once per point
    monkeypatch.setattr(Ties, "merge_parts", original)

    assert len(result.points) == 6
    for point in result.points:
        single = write_recipe(tmp_path / f"single{point.index}.yaml", base, tasks, "ties",
                              {"density": point.values["density"], "lambda": point.values["lambda"]})
        out = tmp_path / f"single{point.index}"
        run_merge(prepare(load_recipe(single)), MergeOptions(out))
        assert (point.output / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
        report = yaml.safe_load((point.output / "merge_report.json").read_text())
        assert report["parameters"]["lambda"] == point.values["lambda"]
        assert report["parameters"]["density"] == point.values["density"]


def test_sweep_picks_the_best_score_and_writes_its_recipe(tmp_path: Path, family: tuple[Path, list[Path]]) -> None:
    base, tasks = family
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", base, tasks, "task_arithmetic", output=tmp_path / "out"))
    work = tmp_path / "sweep"
    result = run_sweep(prepare(recipe), {"lambda": [0.0, 0.5, 1.0]}, EVAL, work, MergeOptions(work), keep="best")
    scores = [p.score for p in result.points]
    assert result.best.score == max(scores)
    assert [p.name for p in work.iterdir() if p.name.startswith("point-")] == [result.best.output.name]
    best = yaml.safe_load(result.best_recipe.read_text())
    assert best["parameters"]["lambda"] == result.best.values["lambda"]
    assert best["method"] == "task_arithmetic" and best["base_model"] == str(base)
    low = run_sweep(prepare(recipe), {"lambda": [0.0, 0.5, 1.0]}, EVAL, tmp_path / "low",
                    MergeOptions(tmp_path / "low"), keep="none", maximize=False)
    assert low.best.score == min(scores)
    assert not any(p.name.startswith("point-") for p in (tmp_path / "low").iterdir())


def test_sweep_rejects_unknown_parameters_and_bad_scores(tmp_path: Path, family: tuple[Path, list[Path]]) -> None:
    base, tasks = family
    prepared = prepare(load_recipe(write_recipe(tmp_path / "r.yaml", base, tasks, "task_arithmetic")))
    opts = MergeOptions(tmp_path / "w")
    with pytest.raises(MergeError, match="--grid density: method 'task_arithmetic' takes no parameter"):
        run_sweep(prepared, {"density": [0.1]}, EVAL, tmp_path / "w", opts)
    with pytest.raises(MergeError, match="parameters.lambda"):
        run_sweep(prepared, {"lambda": [-1.0]}, EVAL, tmp_path / "w", opts)
    with pytest.raises(MergeError, match="last line"):
        run_sweep(prepared, {"lambda": [1.0]}, "echo not-a-number", tmp_path / "w1", MergeOptions(tmp_path / "w1"))
    with pytest.raises(MergeError, match="exited with status 3"):
        run_sweep(prepared, {"lambda": [1.0]}, "exit 3", tmp_path / "w2", MergeOptions(tmp_path / "w2"))


def test_sweep_command_prints_the_table_and_best(tmp_path: Path, family: tuple[Path, list[Path]]) -> None:
    base, tasks = family
    recipe = write_recipe(tmp_path / "r.yaml", base, tasks, "ties", output=tmp_path / "out")
    done = subprocess.run([sys.executable, "-m", "neuromerge_cli", "sweep", str(recipe), "--grid", "lambda=0.5:1.0:0.5",
                           "--eval", EVAL], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "best: lambda=" in done.stdout and "2 points from 1 merge pass(es)" in done.stdout
    assert (tmp_path / "out-sweep" / "best.yaml").exists()
    bad = subprocess.run([sys.executable, "-m", "neuromerge_cli", "sweep", str(recipe), "--grid", "nope=1",
                          "--eval", EVAL], capture_output=True, text=True)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == ["error: --grid nope: method 'ties' takes no parameter 'nope' "
                                               "(allowed: density, lambda, mask_scope, merge_fn)"]
