"""The recipe contract of issue 2: keys, defaults, and errors that name the key and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from neuromerge_cli.errors import MergeError
from neuromerge_cli.recipe import TOP_KEYS, load_recipe, parse_recipe

CONTRACT = """\
base_model: org/base@0123456789abcdef0123456789abcdef01234567
models:
  - model: ./ft/a
    weight: 1.0
  - model: org/b@v1
method: ties
parameters:
  density: 0.2
  lambda: 1.0
  mask_scope: global
  merge_fn: elect_mean
dtype: float32
output: ./merged
"""


def minimal(**overrides: object) -> dict:
    data: dict = {"base_model": "base", "models": [{"model": "a"}, {"model": "b"}], "method": "ties"}
    data.update(overrides)
    return data


def error(data: object) -> str:
    with pytest.raises(MergeError) as info:
        parse_recipe(data)
    return str(info.value)


def test_contract_keys_parse_exactly_as_written(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(CONTRACT)
    r = load_recipe(path)
    assert r.base_model == "org/base@0123456789abcdef0123456789abcdef01234567"
    assert [(m.model, m.weight) for m in r.models] == [("./ft/a", 1.0), ("org/b@v1", 1.0)]
    assert r.method == "ties"
    assert r.params == {"density": 0.2, "lambda": 1.0, "mask_scope": "global", "merge_fn": "elect_mean"}
    assert r.dtype == "float32" and r.torch_dtype == torch.float32
    assert r.output == "./merged"
    assert set(TOP_KEYS) >= {"base_model", "models", "method", "parameters", "dtype", "output"}


def test_dare_takes_seed_and_every_method_of_the_issue_parses() -> None:
    r = parse_recipe(minimal(method="dare_ties", parameters={"density": 0.5, "seed": 7}))
    assert r.params == {"density": 0.5, "lambda": 1.0, "merge_fn": "elect_mean", "seed": 7}
    for method in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"):
        assert parse_recipe(minimal(method=method)).method == method


def test_defaults_filled() -> None:
    r = parse_recipe(minimal())
    assert r.params == {"density": 0.2, "lambda": 1.0, "mask_scope": "global", "merge_fn": "elect_mean"}
    assert r.dtype is None and r.torch_dtype is None and r.output is None
    assert all(m.weight == 1.0 for m in r.models)
    assert parse_recipe(minimal(method="linear")).params == {}
    assert parse_recipe(minimal(method="dare_linear")).params == {"density": 0.2, "lambda": 1.0, "seed": 0}


def test_models_as_plain_strings() -> None:
    r = parse_recipe(minimal(models=["a", {"model": "b", "weight": 2}]))
    assert [(m.model, m.weight) for m in r.models] == [("a", 1.0), ("b", 2.0)]


def test_dtype_aliases() -> None:
    assert parse_recipe(minimal(dtype="bfloat16")).torch_dtype == torch.bfloat16
    assert parse_recipe(minimal(dtype="fp16")).torch_dtype == torch.float16


@pytest.mark.parametrize("data, names", [
    (minimal(lamda=1.0), ["lamda", "base_model", "models", "method", "parameters", "dtype", "output"]),
    (minimal(models=[{"model": "a", "wieght": 1}]), ["models[0].wieght", "model", "weight"]),
    (minimal(parameters={"densty": 0.2}), ["parameters.densty", "density", "lambda", "mask_scope", "merge_fn"]),
    (minimal(method="task_arithmetic", parameters={"density": 0.2}), ["parameters.density", "task_arithmetic", "lambda"]),
    (minimal(method="linear", parameters={"lambda": 1}), ["parameters.lambda", "linear", "none"]),
    (minimal(method="ties", parameters={"seed": 0}), ["parameters.seed", "density"]),
    (minimal(method="tie"), ["method", "'tie'", "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"]),
])
def test_unknown_keys_name_the_key_and_list_the_allowed(data: dict, names: list[str]) -> None:
    msg = error(data)
    for name in names:
        assert name in msg, (name, msg)


@pytest.mark.parametrize("data, names", [
    (minimal(parameters={"density": "0.2"}), ["parameters.density", "number", "'0.2'"]),
    (minimal(parameters={"density": True}), ["parameters.density", "number"]),
    (minimal(parameters={"lambda": None}), ["parameters.lambda", "number"]),
    (minimal(parameters={"mask_scope": "layer"}), ["parameters.mask_scope", "global", "tensor"]),
    (minimal(parameters={"merge_fn": "max"}), ["parameters.merge_fn", "elect_mean", "elect_sum", "mean", "sum"]),
    (minimal(method="dare_ties", parameters={"seed": 1.5}), ["parameters.seed", "integer"]),
    (minimal(parameters=[1, 2]), ["parameters", "mapping"]),
    (minimal(models={"model": "a"}), ["models", "list"]),
    (minimal(models=[]), ["models", "non-empty"]),
    (minimal(models=[3]), ["models[0]", "mapping"]),
    (minimal(models=[{"weight": 1}]), ["models[0].model", "missing"]),
    (minimal(models=[{"model": ""}]), ["models[0].model", "non-empty"]),
    (minimal(models=[{"model": "a", "weight": "x"}]), ["models[0].weight", "number"]),
    (minimal(models=[{"model": "a", "weight": float("nan")}]), ["models[0].weight", "finite"]),
    (minimal(models=["base"]), ["models[0].model", "base model"]),
    (minimal(base_model=5), ["base_model", "string"]),
    (minimal(method=["ties"]), ["method", "method name"]),
    (minimal(dtype="float8"), ["dtype", "float8", "float32", "float16", "bfloat16"]),
    (minimal(dtype=["float32"]), ["dtype", "float32", "bfloat16"]),
    (minimal(output=3), ["output", "folder"]),
    ({"models": ["a"], "method": "ties"}, ["base_model", "missing"]),
    (["base_model", "models"], ["recipe", "mapping"]),
])
def test_wrong_types_name_the_key(data: object, names: list[str]) -> None:
    msg = error(data)
    for name in names:
        assert name in msg, (name, msg)


@pytest.mark.parametrize("params, names", [
    ({"density": 0.0}, ["parameters.density", "> 0"]),
    ({"density": -0.1}, ["parameters.density", "> 0"]),
    ({"density": 1.5}, ["parameters.density", "<= 1"]),
    ({"lambda": -1.0}, ["parameters.lambda", ">= 0"]),
    ({"lambda": float("inf")}, ["parameters.lambda", "finite"]),
])
def test_out_of_range_values(params: dict, names: list[str]) -> None:
    msg = error(minimal(parameters=params))
    for name in names:
        assert name in msg, (name, msg)


def test_weights_must_be_positive_for_averaging_methods() -> None:
    msg = error(minimal(method="ties", models=[{"model": "a", "weight": 0}]))
    assert "models[0].weight" in msg and "> 0" in msg
    # task arithmetic allows negative weights (task negation)
    r = parse_recipe(minimal(method="task_arithmetic", models=[{"model": "a", "weight": -1}]))
    assert r.models[0].weight == -1.0


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("base_model: a\nmodels: [a\nmethod: ties\n")
    with pytest.raises(MergeError, match=r"bad\.yaml: malformed YAML at line \d+"):
        load_recipe(path)
    with pytest.raises(MergeError, match=r"missing\.yaml: no such recipe file$"):
        load_recipe(tmp_path / "missing.yaml")
