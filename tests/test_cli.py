"""The command line: run, validate, methods, inspect — exit codes, key output, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from helpers import hub_cache, load_output, toy_family, write_recipe
from neuromerge_cli.cli import app, parse_size
from neuromerge_cli.errors import MergeError
from neuromerge_cli.methods import METHODS
from reference import reference_merge

runner = CliRunner()


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return toy_family(tmp_path_factory.mktemp("cli"), 2)


def test_run_end_to_end_in_a_subprocess(family: tuple[Path, list[Path]], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A real process, with the base taken from an offline Hub cache set through the environment
    (huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE at import)."""
    base, tasks = family
    commit = "0123456789abcdef0123456789abcdef01234567"
    hub_cache(tmp_path / "hub", "org/base", base, commit)
    recipe = write_recipe(tmp_path / "r.yaml", base, tasks, "task_arithmetic", {"lambda": 0.5},
                          output=tmp_path / "from-recipe")
    data = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump({**data, "base_model": "org/base"}))
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "neuromerge_cli", "run", str(recipe), "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "method task_arithmetic" in done.stdout and f"wrote {tmp_path / 'from-recipe'}" in done.stdout
    out, ref = load_output(tmp_path / "from-recipe"), reference_merge(base, tasks, "task_arithmetic", {"lambda": 0.5})
    assert all(float((t.double() - ref[n].double()).abs().max()) < 1e-6 for n, t in out.items())
    report = json.loads((tmp_path / "from-recipe" / "merge_report.json").read_text())
    assert report["inputs"]["base"]["revision"] == commit and report["inputs"]["base"]["source"] == "hub"
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # in this process: patch the constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    again = runner.invoke(app, [str(a) for a in cmd[3:]])
    assert again.exit_code == 1 and again.stdout == ""
    assert again.stderr == f"error: output: {tmp_path / 'from-recipe'} already exists (use --overwrite to replace it)\n"


def test_run_options(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, tasks = family
    recipe = write_recipe(tmp_path / "r.yaml", base, tasks, "ties", output=tmp_path / "ignored")
    target = tmp_path / "out"
    result = runner.invoke(app, ["run", str(recipe), "--output", str(target), "--device", "cpu", "--shard-size", "1KB", "-q"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and not (tmp_path / "ignored").exists()
    assert (target / "model.safetensors.index.json").exists() and len(list(target.glob("model-*.safetensors"))) > 1
    (target / "marker").write_text("old")
    result = runner.invoke(app, ["run", str(recipe), "-o", str(target), "--device", "cpu"])
    assert result.exit_code == 1 and "already exists" in result.stderr
    result = runner.invoke(app, ["run", str(recipe), "-o", str(target), "--device", "cpu", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (target / "marker").exists() and (target / "model.safetensors").exists()
    report = json.loads((target / "merge_report.json").read_text())
    assert report["device"] == "cpu" and report["method"] == "ties"


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "--device: expected auto, cpu or cuda"),
    (["--shard-size", "lots"], "--shard-size: expected a size"),
])
def test_run_bad_options_are_one_line(family: tuple[Path, list[Path]], tmp_path: Path, args: list[str], message: str) -> None:
    base, tasks = family
    recipe = write_recipe(tmp_path / "r.yaml", base, tasks, "linear")
    result = runner.invoke(app, ["run", str(recipe), "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 1 and message in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_run_without_an_output(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, tasks = family
    recipe = write_recipe(tmp_path / "r.yaml", base, tasks, "linear")
    result = runner.invoke(app, ["run", str(recipe)])
    assert result.exit_code == 1 and "output: no output folder" in result.stderr


def test_validate(family: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, tasks = family
    recipe = write_recipe(tmp_path / "r.yaml", base, tasks, "ties")
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok: ties over 2 models") and "7 tensors (4 neuron, 2 point, 1 copied), 0 tied, 1 output shard(s)" in result.stdout
    data = yaml.safe_load(recipe.read_text())
    data["parameters"] = {"density": 0.2, "lamda": 1}
    recipe.write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: parameters.lamda: method 'ties' takes no parameter 'lamda' (did you mean 'lambda'? allowed: density, lambda")
    assert not list(tmp_path.glob(".*tmp*"))


def test_methods_lists_every_method_with_parameters_and_defaults() -> None:
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    text = result.stdout
    for name, cls in METHODS.items():
        assert f"{name}: {cls.summary}" in text
        for p in cls.params:
            row = next(line for line in text.splitlines()[text.splitlines().index(f"{name}: {cls.summary}"):]
                       if line.strip().startswith(p.name))
            assert str(p.default) in row, (name, p.name, row)
    assert {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"} <= set(METHODS)


def test_inspect(family: tuple[Path, list[Path]]) -> None:
    base, _ = family
    result = runner.invoke(app, ["inspect", str(base)])
    assert result.exit_code == 0, result.output
    assert f"-> {base.resolve()}" in result.stdout
    assert "7 tensors, 522 parameters in 1 file(s)" in result.stdout
    assert "neuron parameters 488, point parameters 24, copied (integer) 10" in result.stdout
    dtypes = next(line for line in result.stdout.splitlines() if line.startswith("dtypes: "))
    assert sorted(dtypes.removeprefix("dtypes: ").split(", ")) == ["float32 512", "int64 10"]
    result = runner.invoke(app, ["inspect", "./no/such/model"])
    assert result.exit_code == 1 and result.stderr == "error: ./no/such/model: no such folder\n"


def test_inspect_a_hub_id_offline(family: tuple[Path, list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    commit = "89abcdef0123456789abcdef0123456789abcdef"
    snapshot = hub_cache(tmp_path / "hub", "org/base", family[0], commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = runner.invoke(app, ["inspect", f"org/base@{commit}"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == f"org/base@{commit} -> {snapshot} (revision {commit})"
    result = runner.invoke(app, ["inspect", "org/other"])
    assert result.exit_code == 1 and result.stderr.startswith("error: org/other: ") and result.stderr.count("\n") == 1


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("1000") == 1000
    assert parse_size("1.5kb") == 1500
    for bad in ("", "-1GB", "5XB", "GB"):
        with pytest.raises(MergeError):
            parse_size(bad)
