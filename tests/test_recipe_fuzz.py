"""Property tests of the recipe loader: any input gives a valid Recipe or one clear MergeError."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neuromerge_cli.errors import MergeError
from neuromerge_cli.methods import METHODS
from neuromerge_cli.recipe import DTYPES, TOP_KEYS, ModelEntry, Recipe, load_recipe, parse_recipe

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# "where: what is wrong": the key, file or tensor at fault, then the problem, on one line.
MESSAGE = re.compile(r"^\S[^\n]*?: \S[^\n]*$")

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["auto", "ties", "float32", "bf16", "global", "elect_mean", "", " ", "\n", "1e400", "a\nb", "tiez\n"]),
)
keys = st.one_of(st.text(max_size=10), st.integers(), st.none(), st.booleans(),
                 st.sampled_from(list(TOP_KEYS) + ["model", "weight", "density", "lambda", "seed"]))
junk = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(keys, inner, max_size=3)),
                    max_leaves=8)


def param_values(method: str) -> st.SearchStrategy[dict[str, Any]]:
    """A method's parameters, each either a plausible value or junk (so valid recipes occur too)."""
    names = [p.name for p in METHODS[method].params]
    plausible = st.one_of(st.floats(0.0, 1.0), st.integers(0, 5), st.sampled_from(
        ["auto", "global", "tensor", "elect_mean", "elect_sum", "mean", "sum"]))
    return st.dictionaries(st.sampled_from(names + ["unknown_param"]), st.one_of(plausible, junk), max_size=4)


@st.composite
def near_valid_recipes(draw: st.DrawFn) -> dict[str, Any]:
    """A valid-looking recipe with some keys replaced by junk, deleted or added."""
    method = draw(st.sampled_from(sorted(METHODS)))
    models = draw(st.lists(st.one_of(
        st.sampled_from(["task_a", "task_b", "base", "a\nb", " base "]),
        st.fixed_dictionaries({"model": st.sampled_from(["task_a", "task_b"])},
                              optional={"weight": st.one_of(st.floats(-2, 2), junk), "extra": junk}),
        junk), min_size=0, max_size=3))
    data: dict[str, Any] = {"base_model": "base", "models": models, "method": method,
                            "parameters": draw(param_values(method))}
    if draw(st.booleans()):
        data["dtype"] = draw(st.one_of(st.sampled_from(sorted(DTYPES)), junk))
    if draw(st.booleans()):
        data["output"] = draw(st.one_of(st.just("./merged"), junk))
    for key in draw(st.lists(st.sampled_from(list(TOP_KEYS) + ["unknown_key"]), max_size=2)):
        if draw(st.booleans()):
            data.pop(key, None)
        else:
            data[key] = draw(junk)
    return data


def check_outcome(data: Any) -> None:
    """parse_recipe gives a consistent Recipe or a one-line MergeError naming where it failed."""
    try:
        recipe = parse_recipe(data)
    except MergeError as exc:
        assert MESSAGE.match(str(exc)), f"unclear message: {str(exc)!r}"
        return
    assert isinstance(recipe, Recipe)
    assert recipe.models and all(isinstance(m, ModelEntry) and math.isfinite(m.weight) for m in recipe.models)
    assert all(m.model != recipe.base_model for m in recipe.models)
    assert recipe.method in METHODS
    assert set(recipe.params) == {p.name for p in METHODS[recipe.method].params}
    assert recipe.dtype is None or recipe.dtype in DTYPES


@FUZZ
@given(junk)
def test_any_structure_is_a_recipe_or_a_clear_error(data: Any) -> None:
    check_outcome(data)


@FUZZ
@given(st.dictionaries(st.sampled_from(list(TOP_KEYS)), junk, max_size=len(TOP_KEYS)))
def test_random_values_at_every_key(data: dict[str, Any]) -> None:
    check_outcome(data)


@FUZZ
@given(near_valid_recipes())
def test_near_valid_recipes(data: dict[str, Any]) -> None:
    check_outcome(data)


def test_the_near_valid_strategy_reaches_valid_recipes() -> None:
    """Guard against a fuzzer that only ever produces errors: a plain recipe of the same shape parses."""
    recipe = parse_recipe({"base_model": "base", "models": ["task_a", {"model": "task_b", "weight": 0.5}],
                           "method": "ties", "parameters": {"density": 0.5}})
    assert recipe.params["density"] == 0.5 and [m.weight for m in recipe.models] == [1.0, 0.5]


def _mutate(text: str, cuts: list[tuple[int, str]]) -> str:
    for pos, piece in cuts:
        pos = pos % (len(text) + 1)
        text = text[:pos] + piece + text[pos + 1:]
    return text


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "recipe.yaml"


@FUZZ
@given(st.one_of(
    st.text(max_size=80),
    st.tuples(near_valid_recipes(), st.lists(st.tuples(st.integers(0, 400), st.sampled_from(
        [":", "-", "[", "{", "'", '"', "\t", "\n", " ", "&a", "*a", "!!python/object:os.system", "%", "?", "|", "\x00"])),
        max_size=4)).map(lambda dc: _mutate(yaml.safe_dump(dc[0], allow_unicode=True), dc[1])),
    st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
))
def test_random_yaml_text(recipe_file: Path, text: str) -> None:
    recipe_file.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        load_recipe(recipe_file)
    except MergeError as exc:
        assert MESSAGE.match(str(exc)), f"unclear message: {str(exc)!r}"


def test_deeply_nested_yaml_is_a_clear_error(recipe_file: Path) -> None:
    recipe_file.write_text("models: " + "[" * 600 + "]" * 600 + "\n")
    with pytest.raises(MergeError, match=re.escape(str(recipe_file))):
        load_recipe(recipe_file)
