"""The same recipe and inputs give byte-identical shards, config and model card: in one process and across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import toy_family, write_recipe
from neuromerge_cli.engine import MergeOptions, prepare, run_merge
from neuromerge_cli.recipe import load_recipe

VOLATILE = ("created", "timings", "peak_memory")  # report fields that may differ between runs


def merge(recipe: Path, out: Path, shard_size: int = 10**9) -> dict:
    prepared = prepare(load_recipe(recipe), shard_size)
    return run_merge(prepared, MergeOptions(out, "cpu", shard_size=shard_size))


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def stable(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in VOLATILE}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return toy_family(tmp_path_factory.mktemp("det"), 3)


@pytest.mark.parametrize("method, parameters", [
    ("dare_ties", {"density": 0.5}),
    ("dare_linear", {"density": 0.3}),
    ("ties", {"density": 0.4}),
], ids=["dare_ties", "dare_linear", "ties"])
def test_same_inputs_same_bytes(tmp_path: Path, family: tuple[Path, list[Path]], method: str,
                                parameters: dict) -> None:
    base, tasks = family
    recipe = write_recipe(tmp_path / "recipe.yaml", base, tasks, method, parameters)
    # A small shard size gives several shards and an index: those must be stable too.
    first, second = merge(recipe, tmp_path / "a", 600), merge(recipe, tmp_path / "b", 600)
    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert len([n for n in a if n.endswith(".safetensors")]) > 1
    assert a.keys() == b.keys()
    for name in a:
        if name != "merge_report.json":
            assert a[name] == b[name], f"{name} differs between two runs"
    assert stable(first) == stable(second)
    assert stable(json.loads(a["merge_report.json"])) == stable(json.loads(b["merge_report.json"]))


def test_dare_seed_defaults_to_a_fixed_value_recorded_in_the_report(tmp_path: Path,
                                                                     family: tuple[Path, list[Path]]) -> None:
    base, tasks = family
    default = write_recipe(tmp_path / "default.yaml", base, tasks, "dare_ties", {"density": 0.5})
    seeded = write_recipe(tmp_path / "seeded.yaml", base, tasks, "dare_ties", {"density": 0.5, "seed": 0})
    other = write_recipe(tmp_path / "other.yaml", base, tasks, "dare_ties", {"density": 0.5, "seed": 1})
    report = merge(default, tmp_path / "default")
    assert report["parameters"]["seed"] == 0
    assert json.loads((tmp_path / "default" / "merge_report.json").read_text())["parameters"]["seed"] == 0
    merge(seeded, tmp_path / "seeded")
    merge(other, tmp_path / "other")
    shard = "model.safetensors"
    assert (tmp_path / "default" / shard).read_bytes() == (tmp_path / "seeded" / shard).read_bytes()
    assert (tmp_path / "default" / shard).read_bytes() != (tmp_path / "other" / shard).read_bytes()


def test_same_bytes_in_another_process(tmp_path: Path, family: tuple[Path, list[Path]]) -> None:
    """A fresh interpreter with another hash seed (set and dict-of-set orders) writes the same bytes."""
    base, tasks = family
    recipe = write_recipe(tmp_path / "recipe.yaml", base, tasks, "dare_ties", {"density": 0.5})
    merge(recipe, tmp_path / "here")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-m", "neuromerge_cli", "run", str(recipe), "-q", "--device", "cpu",
                    "--output", str(tmp_path / "there")], check=True, env=env, timeout=300)
    here, there = files(tmp_path / "here"), files(tmp_path / "there")
    assert here.keys() == there.keys()
    for name in here:
        if name != "merge_report.json":
            assert here[name] == there[name], f"{name} differs between processes"
