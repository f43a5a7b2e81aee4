"""Model card rendering and Hub push, tested at the transport edge (HfApi methods patched)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from huggingface_hub import HfApi
from typer.testing import CliRunner

from helpers import fine_tune, toy_family, toy_tensors, write_model, write_recipe
from neuromerge_cli.cli import app
from neuromerge_cli.engine import MergeOptions, prepare, run_merge
from neuromerge_cli.errors import MergeError
from neuromerge_cli.hub import check_folder, load_quality, model_card, pinned_recipe, push_folder
from neuromerge_cli.recipe import load_recipe

SHA = "0123456789abcdef0123456789abcdef01234567"
QUALITY = {"paws (accuracy)": {"base": 0.52, "merged": 0.9031}, "qasc (accuracy)": {"base": 0.11, "merged": "n/a"}}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return toy_family(tmp_path_factory.mktemp("family"), num_tasks=2)


def _merge(family: tuple[Path, list[Path]], root: Path, shard_size: int = 10**9) -> Path:
    base, tasks = family
    recipe = load_recipe(write_recipe(root / "r.yaml", base, tasks, "ties", {"density": 0.5}))
    out = root / "merged"
    run_merge(prepare(recipe, shard_size), MergeOptions(out, "cpu", shard_size=shard_size))
    return out


@pytest.fixture(scope="module")
def merged(family: tuple[Path, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _merge(family, tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def sharded(family: tuple[Path, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = _merge(family, tmp_path_factory.mktemp("sharded"), shard_size=700)
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("*.safetensors"))) > 2
    return out


@pytest.fixture
def hub_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple, dict]]:
    """Every HfApi call hub.py makes, with its arguments; upload_folder also records the files it saw."""
    calls: list[tuple[str, tuple, dict]] = []

    def recorder(name: str):
        def call(self, *args, **kwargs):
            if name == "upload_folder":
                folder = Path(kwargs["folder_path"])
                kwargs = {**kwargs, "_files": sorted(p.name for p in folder.iterdir()),
                          "_card": (folder / "README.md").read_text()}
                calls.append((name, args, kwargs))
                return SimpleNamespace(commit_url="https://huggingface.co/user/m/commit/abc")
            calls.append((name, args, kwargs))
            return None
        return call

    for name in ("create_repo", "create_branch", "upload_folder"):
        monkeypatch.setattr(HfApi, name, recorder(name))
    return calls


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    end = card.index("\n---\n", 4)
    return yaml.safe_load(card[4:end])


def _hub_report(merged: Path) -> dict:
    """The real report of the merge, as if its inputs had come from the Hub, with NeuroMerging's scales."""
    report = json.loads((merged / "merge_report.json").read_text())
    report = copy.deepcopy(report)
    report["inputs"]["base"] = {"reference": "org/base", "path": "/cache/base", "revision": SHA, "source": "hub"}
    report["inputs"]["models"][0].update(reference="org/task-a@v1", source="hub", revision="f" * 40)
    report["recipe"]["base_model"] = "org/base"
    report["recipe"]["models"][0] = {"model": "org/task-a@v1", "weight": 1.0}
    report["global"].update(sigma=0.42, lambda1=0.0, lambda2=1.0 / (1 - 0.42), lambda2_auto=True)
    return report


# ---------------------------------------------------------------- model card


def test_card_front_matter_and_contents(merged: Path) -> None:
    report = _hub_report(merged)
    card = model_card(report, QUALITY)
    front = _front_matter(card)
    assert front["base_model"] == "org/base"
    assert front["base_model_relation"] == "merge"
    assert front["tags"] == ["merge", "neuromerge", "ties"]
    assert front["library_name"] == "transformers"
    # inputs with their resolved revisions, the local one marked as such
    assert f"| base | `org/base` | {SHA} |" in card
    assert f"| model 1 | `org/task-a@v1` | {'f' * 40} | 1 |" in card
    assert f"| model 2 | `{report['inputs']['models'][1]['reference']}` | (local folder) | 1 |" in card
    # method, parameters (defaults filled in), σ_t per task and the scales
    for key, value in report["parameters"].items():
        assert f"| {key} | {value if not isinstance(value, float) else format(value, '.4g')} |" in card
    for row in report["tasks"]:
        assert f"| {row['sigma']:.4g} | {row['threshold']:.4g} | {row['kept_fraction']:.4g} |" in card
    assert "σ = 0.42, λ1 = 0, λ2 = 1.724 (λ2 = 1/(1 − σ), automatic)" in card
    # the quality table, rows and columns as given
    assert "## Quality" in card
    assert "|  | base | merged |" in card
    assert "| paws (accuracy) | 0.52 | 0.9031 |" in card
    assert "| qasc (accuracy) | 0.11 | n/a |" in card


def test_card_recipe_pins_hub_inputs(merged: Path) -> None:
    report = _hub_report(merged)
    card = model_card(report)
    block = card.split("```yaml\n", 1)[1].split("```", 1)[0]
    recipe = yaml.safe_load(block)
    assert recipe == pinned_recipe(report)
    assert recipe["base_model"] == f"org/base@{SHA}"
    assert recipe["models"][0] == {"model": f"org/task-a@{'f' * 40}", "weight": 1.0}
    assert recipe["models"][1] == report["recipe"]["models"][1]  # local: as written
    assert recipe["parameters"] == report["recipe"]["parameters"]
    assert "## Quality" not in card


def test_card_of_local_base_has_no_base_model(merged: Path) -> None:
    card = (merged / "README.md").read_text()
    front = _front_matter(card)
    assert "base_model" not in front  # the Hub accepts only repo ids there
    assert front["tags"] == ["merge", "neuromerge", "ties"]
    assert card == model_card(json.loads((merged / "merge_report.json").read_text()))


def test_card_without_trim_has_no_sigma(merged: Path) -> None:
    report = json.loads((merged / "merge_report.json").read_text())
    report.update(method="task_arithmetic", parameters={"lambda": 0.5}, tasks=[{"model": "a"}, {"model": "b"}], **{"global": {}})
    card = model_card(report)
    assert "σ_t" not in card and "λ2" not in card
    assert "| lambda | 0.5 |" in card


@pytest.mark.parametrize("content, message", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "expected a non-empty JSON object"),
    ('{"paws": 0.9}', "row 'paws': expected a non-empty object"),
    ('{"paws": {"merged": [1]}}', "row 'paws', column 'merged': expected a number or text"),
])
def test_quality_file_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "q.json"
    path.write_text(content)
    with pytest.raises(MergeError, match=message):
        load_quality(path)


def test_quality_file_reads(tmp_path: Path) -> None:
    path = tmp_path / "q.json"
    path.write_text(json.dumps(QUALITY))
    assert load_quality(path) == QUALITY


# ---------------------------------------------------------------- folder checks


def test_complete_folders_pass(merged: Path, sharded: Path) -> None:
    assert check_folder(merged)["method"] == "ties"
    assert check_folder(sharded)["totals"]["shards"] > 2


def _break_missing_report(folder: Path) -> None:
    (folder / "merge_report.json").unlink()


def _break_bad_report(folder: Path) -> None:
    (folder / "merge_report.json").write_text("{\"method\": ")


def _break_no_card(folder: Path) -> None:
    (folder / "README.md").unlink()


def _break_missing_shard(folder: Path) -> None:
    sorted(folder.glob("model-*.safetensors"))[1].unlink()


def _break_header(folder: Path) -> None:
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe{{"
    shard.write_bytes(bytes(data))


def _break_truncated(folder: Path) -> None:
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-4])


def _break_index_entry(folder: Path) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, s in index["weight_map"].items() if s == shards[0])
    index["weight_map"][name] = shards[1]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _break_count(folder: Path) -> None:
    report = json.loads((folder / "merge_report.json").read_text())
    report["totals"]["tensors"] += 1
    (folder / "merge_report.json").write_text(json.dumps(report))


@pytest.mark.parametrize("damage, message", [
    (_break_missing_report, "no merge_report.json"),
    (_break_bad_report, "corrupted report"),
    (_break_no_card, "no README.md"),
    (_break_missing_shard, "points at missing shard"),
    (_break_header, "corrupted safetensors header"),
    (_break_truncated, "truncated"),
    (_break_index_entry, "is not in shard"),
    (_break_count, "tensors, but merge_report.json says"),
])
def test_incomplete_folder_is_never_pushed(sharded: Path, tmp_path: Path, hub_calls: list, damage, message: str) -> None:
    folder = _copy(sharded, tmp_path)
    damage(folder)
    with pytest.raises(MergeError, match=message):
        push_folder(folder, "user/m")
    assert hub_calls == []


def test_missing_folder_is_not_pushed(tmp_path: Path, hub_calls: list) -> None:
    with pytest.raises(MergeError, match="no such folder"):
        push_folder(tmp_path / "nothing", "user/m")
    assert hub_calls == []


# ---------------------------------------------------------------- push


def test_push_calls(merged: Path, tmp_path: Path, hub_calls: list) -> None:
    folder = _copy(merged, tmp_path)
    url = push_folder(folder, "user/m", private=True, revision="exp-1", commit_message="first merge")
    assert url == "https://huggingface.co/user/m/commit/abc"
    names = [c[0] for c in hub_calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    _, args, kwargs = hub_calls[0]
    assert args == ("user/m",) and kwargs == {"private": True, "repo_type": "model", "exist_ok": True}
    _, args, kwargs = hub_calls[1]
    assert args == ("user/m",) and kwargs == {"branch": "exp-1", "repo_type": "model", "exist_ok": True}
    _, args, kwargs = hub_calls[2]
    assert args == ()
    assert kwargs["repo_id"] == "user/m" and kwargs["folder_path"] == str(folder)
    assert kwargs["revision"] == "exp-1" and kwargs["commit_message"] == "first merge"
    assert kwargs["repo_type"] == "model"
    assert kwargs["_files"] == ["README.md", "config.json", "merge_report.json", "model.safetensors"]


@pytest.mark.parametrize("revision", [None, "main"])
def test_push_to_main_creates_no_branch(merged: Path, tmp_path: Path, hub_calls: list, revision: str | None) -> None:
    push_folder(_copy(merged, tmp_path), "user/m", revision=revision)
    assert [c[0] for c in hub_calls] == ["create_repo", "upload_folder"]
    kwargs = hub_calls[-1][2]
    assert kwargs["revision"] == revision
    assert kwargs["commit_message"] == "Upload model merged with neuromerge (ties)"
    assert hub_calls[0][2]["private"] is False


def test_push_with_quality_rewrites_the_card(merged: Path, tmp_path: Path, hub_calls: list) -> None:
    folder = _copy(merged, tmp_path)
    push_folder(folder, "user/m", quality=QUALITY)
    uploaded = hub_calls[-1][2]["_card"]
    assert "| paws (accuracy) | 0.52 | 0.9031 |" in uploaded
    assert (folder / "README.md").read_text() == uploaded


def test_hub_failure_is_one_clear_error(merged: Path, tmp_path: Path, hub_calls: list, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self, *args, **kwargs):
        raise RuntimeError("401 Client Error: Unauthorized\nmore text")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    with pytest.raises(MergeError, match=r"^hub: push of .* to 'user/m' failed \(RuntimeError: 401 Client Error: Unauthorized\)$"):
        push_folder(_copy(merged, tmp_path), "user/m")
    assert hub_calls == []


# ---------------------------------------------------------------- through the CLI


def test_cli_push(merged: Path, tmp_path: Path, hub_calls: list) -> None:
    folder = _copy(merged, tmp_path)
    quality = tmp_path / "q.json"
    quality.write_text(json.dumps(QUALITY))
    result = CliRunner().invoke(app, ["push", str(folder), "user/m", "--private", "--branch", "dev",
                                      "-m", "msg", "--quality", str(quality)])
    assert result.exit_code == 0, result.output
    assert [c[0] for c in hub_calls] == ["create_repo", "create_branch", "upload_folder"]
    kwargs = hub_calls[-1][2]
    assert (kwargs["revision"], kwargs["commit_message"]) == ("dev", "msg")
    assert "## Quality" in kwargs["_card"]
    assert "pushed" in result.stdout and "https://huggingface.co/user/m/commit/abc" in result.stdout


def test_cli_push_refuses_incomplete_folder(merged: Path, tmp_path: Path, hub_calls: list) -> None:
    folder = _copy(merged, tmp_path)
    (folder / "merge_report.json").unlink()
    result = CliRunner().invoke(app, ["push", str(folder), "user/m"])
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    assert hub_calls == []


def _hub_recipe(family: tuple[Path, list[Path]], tmp_path: Path, tasks: list[Path] | None = None) -> Path:
    base, default_tasks = family
    return write_recipe(tmp_path / "r.yaml", base, tasks or default_tasks, "ties", {"density": 0.5}, tmp_path / "out",
                        hub={"repo_id": "user/merged", "private": True, "revision": "v2", "commit_message": "auto"})


def test_run_pushes_after_a_successful_merge(family, tmp_path: Path, hub_calls: list) -> None:
    result = CliRunner().invoke(app, ["run", str(_hub_recipe(family, tmp_path)), "--quiet"])
    assert result.exit_code == 0, result.output
    assert [c[0] for c in hub_calls] == ["create_repo", "create_branch", "upload_folder"]
    assert hub_calls[0][2]["private"] is True
    kwargs = hub_calls[-1][2]
    assert kwargs["folder_path"] == str(tmp_path / "out")  # the published folder, not the temporary one
    assert "merge_report.json" in kwargs["_files"]
    assert (kwargs["repo_id"], kwargs["revision"], kwargs["commit_message"]) == ("user/merged", "v2", "auto")


def test_run_no_push_and_dry_run_push_nothing(family, tmp_path: Path, hub_calls: list) -> None:
    recipe = _hub_recipe(family, tmp_path)
    result = CliRunner().invoke(app, ["run", str(recipe), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "then push to the Hub: user/merged (branch v2)" in result.stdout
    result = CliRunner().invoke(app, ["run", str(recipe), "--no-push", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "merge_report.json").exists()
    assert hub_calls == []


def test_failed_merge_never_pushes(family, tmp_path: Path, hub_calls: list) -> None:
    base, tasks = family
    bad = toy_tensors(0)
    bad = fine_tune(bad, 5)
    bad["layer.0.weight"][0, 0] = torch.nan
    broken = write_model(tmp_path / "nan_task", bad)
    result = CliRunner().invoke(app, ["run", str(_hub_recipe(family, tmp_path, [tasks[0], broken]))])
    assert result.exit_code == 1
    assert "contains NaN or Inf" in result.stderr
    assert not (tmp_path / "out").exists()
    assert hub_calls == []


def test_failed_push_keeps_the_merge(family, tmp_path: Path, hub_calls: list, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(self, *args, **kwargs):
        raise OSError("Hub unreachable")

    monkeypatch.setattr(HfApi, "upload_folder", offline)
    result = CliRunner().invoke(app, ["run", str(_hub_recipe(family, tmp_path)), "--quiet"])
    assert result.exit_code == 1
    assert "failed (OSError: Hub unreachable); the merge itself is complete: retry with " \
           f"`neuromerge push {tmp_path / 'out'} user/merged`" in result.stderr
    assert (tmp_path / "out" / "merge_report.json").exists()
