"""The recipe's `classify` section and the models' `category` keys."""

from __future__ import annotations

import pytest

from neuromerge_cli.errors import MergeError
from neuromerge_cli.recipe import parse_recipe


def recipe(classify: object, **model: object) -> dict:
    return {"base_model": "base", "models": [{"model": "ft", **model}], "method": "neuronmerge",
            "parameters": {"groups": "g.safetensors"}, "classify": classify}


def test_defaults_and_category_order() -> None:
    r = parse_recipe(recipe({"corpora": {"math": "m.jsonl", "general": ["a.txt", "b.txt"]}, "output": "g.safetensors"},
                            category="math"))
    c = r.classify
    assert c.categories == ["general", "math"]  # general first, then the recipe's order
    assert c.corpora["general"] == ("a.txt", "b.txt")
    assert (c.top_k, c.max_tokens, c.batch_size, c.max_exemplars, c.dtype) == (10, 256, 8, None, "float32")
    assert r.models[0].category == "math"


@pytest.mark.parametrize("classify, message", [
    ({"corpora": {"general": "a"}, "topk": 3}, r"classify.topk: unknown key \(did you mean 'top_k'\? allowed: corpora, top_k"),
    ({"corpora": {"math": "a"}}, r"classify.corpora: missing the 'general' category"),
    ({"corpora": {"general": "a"}}, r"classify.corpora: needs at least one task category"),
    ({"corpora": {"general": "a", "math": []}}, r"classify.corpora.math: expected a file path or a non-empty list"),
    ({"corpora": {"general": "a", "m a": "b"}}, r"classify.corpora.m a: expected a category name"),
    ({"corpora": {"general": "a", "math": "b"}, "top_k": 0}, r"classify.top_k: must be >= 1"),
    ({"corpora": {"general": "a", "math": "b"}, "batch_size": 2.5}, r"classify.batch_size: expected an integer"),
    ({"corpora": {"general": "a", "math": "b"}, "dtype": "int8"}, r"classify.dtype: expected one of"),
    ({"corpora": {"general": "a", "code": "b"}}, r"models\[0\].category: 'math' has no corpus in classify.corpora"),
    ("yes", r"classify: expected a mapping"),
])
def test_errors_name_the_key(classify: object, message: str) -> None:
    with pytest.raises(MergeError, match=message):
        parse_recipe(recipe(classify, category="math"))


def test_bad_category_name() -> None:
    with pytest.raises(MergeError, match=r"models\[0\].category: expected a category name"):
        parse_recipe(recipe(None, category=3))
