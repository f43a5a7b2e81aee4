"""The YAML recipe: schema, validation and a typed, immutable recipe object."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .errors import MergeError, did_you_mean, key_text
from .methods import get_method
from .methods.params import as_number, choice, integer
from .neuron_groups import GENERAL as GENERAL_CATEGORY

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
TOP_KEYS = ("base_model", "models", "method", "parameters", "dtype", "output", "hub", "classify")
MODEL_KEYS = ("model", "weight", "category")
HUB_KEYS = ("repo_id", "private", "revision", "commit_message")
REPO_ID = re.compile(r"^[\w.\-]+(/[\w.\-]+)?$")
CLASSIFY_KEYS = ("corpora", "top_k", "max_tokens", "batch_size", "max_exemplars", "dtype", "output")
CATEGORY_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")
CLASSIFY_PARAMS = (
    integer("top_k", 10, "exemplars per neuron that vote on its category", lo=1),
    integer("max_tokens", 256, "tokens per exemplar (longer ones are truncated)", lo=1),
    integer("batch_size", 8, "exemplars per forward pass", lo=1),
    integer("max_exemplars", None, "use at most this many exemplars per category (first ones)", lo=1),
    choice("dtype", "float32", "dtype the base model runs in", ("float32", "bfloat16", "float16")),
)


@dataclass(frozen=True)
class ModelEntry:
    """One fine-tuned model of the recipe."""

    model: str
    weight: float = 1.0
    category: str | None = None  # its task category (methods with uses_categories, e.g. neuronmerge)


@dataclass(frozen=True)
class ClassifyConfig:
    """The `classify` section: exemplar corpora per category and how neurons are classified."""

    corpora: dict[str, tuple[str, ...]]  # category -> files; `general` first, then recipe order
    top_k: int = 10
    max_tokens: int = 256
    batch_size: int = 8
    max_exemplars: int | None = None
    dtype: str = "float32"
    output: str | None = None

    @property
    def categories(self) -> list[str]:
        return list(self.corpora)


@dataclass(frozen=True)
class HubTarget:
    """Where ``neuromerge run`` pushes the merged folder (the recipe's ``hub:`` section)."""

    repo_id: str
    private: bool = False
    revision: str | None = None  # a branch; created from main when missing
    commit_message: str | None = None


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. ``params`` holds the method's parameters with defaults filled in."""

    base_model: str
    models: tuple[ModelEntry, ...]
    method: str
    params: dict[str, Any]
    dtype: str | None = None
    output: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    hub: HubTarget | None = None
    classify: ClassifyConfig | None = None

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype is None else DTYPES[self.dtype]


def _reference(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip() or not value.strip().isprintable():
        raise MergeError(f"{key}: expected a local path or Hub id (a non-empty, one-line string), got {value!r}")
    return value.strip()


def _unknown(keys: Any, allowed: tuple[str, ...], where: str) -> None:
    for key in keys:
        if key not in allowed:
            raise MergeError(f"{where}{key_text(key)}: unknown key "
                             f"({did_you_mean(key, allowed)}allowed: {', '.join(allowed)})")


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a recipe given as parsed YAML; every error names the key at fault.

    ``source`` names the recipe (its file) in errors about the recipe as a whole.
    """
    if data is None:
        raise MergeError(f"{source}: the recipe is empty (expected a mapping with keys base_model, models, method)")
    if not isinstance(data, dict):
        raise MergeError(f"{source}: expected a mapping of keys ({', '.join(TOP_KEYS)}), got {type(data).__name__}")
    _unknown(data, TOP_KEYS, "")
    for key in ("base_model", "models", "method"):
        if key not in data:
            raise MergeError(f"{key}: missing (required keys: base_model, models, method)")
    base = _reference(data["base_model"], "base_model")
    models_raw = data["models"]
    if not isinstance(models_raw, list) or not models_raw:
        raise MergeError("models: expected a non-empty list of {model: PATH_OR_ID, weight: NUMBER}")
    models = []
    for i, entry in enumerate(models_raw):
        where = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict):
            raise MergeError(f"{where}: expected a mapping with 'model' (and optional 'weight'), got {entry!r}")
        _unknown(entry, MODEL_KEYS, f"{where}.")
        if "model" not in entry:
            raise MergeError(f"{where}.model: missing")
        ref = _reference(entry["model"], f"{where}.model")
        try:
            weight = as_number(entry.get("weight", 1.0))
        except ValueError as exc:
            raise MergeError(f"{where}.weight: {exc}") from None
        if ref == base:
            raise MergeError(f"{where}.model: '{ref}' is the base model; list only fine-tuned models")
        category = entry.get("category")
        if category is not None and (not isinstance(category, str) or not CATEGORY_NAME.match(category)):
            raise MergeError(f"{where}.category: expected a category name (letters, digits, _ or -), got {category!r}")
        models.append(ModelEntry(ref, weight, category))
    method_name = data["method"]
    if not isinstance(method_name, str):
        raise MergeError(f"method: expected a method name, got {method_name!r}")
    method = get_method(method_name)
    if len(models) < method.min_models or (method.max_models is not None and len(models) > method.max_models):
        want = method.min_models if method.max_models == method.min_models else f"at least {method.min_models}"
        raise MergeError(f"models: method '{method.name}' takes {want} model(s), got {len(models)}")
    for i, m in enumerate(models):
        if method.positive_weights and m.weight <= 0:
            raise MergeError(f"models[{i}].weight: method '{method.name}' needs a weight > 0, got {m.weight:g}")
    raw_params = data.get("parameters") or {}
    if not isinstance(raw_params, dict):
        raise MergeError(f"parameters: expected a mapping, got {raw_params!r}")
    params = method.parse_params(raw_params)
    classify = parse_classify(data["classify"]) if data.get("classify") is not None else None
    _check_categories(models, method.name, method.uses_categories, classify)
    dtype = data.get("dtype")
    if dtype is not None and (not isinstance(dtype, str) or dtype not in DTYPES):
        raise MergeError(f"dtype: unknown dtype {dtype!r} (allowed: float32, float16, bfloat16)")
    output = data.get("output")
    if output is not None and (not isinstance(output, str) or not output.strip() or not output.isprintable()):
        raise MergeError(f"output: expected a folder path, got {output!r}")
    hub = parse_hub(data["hub"]) if "hub" in data else None
    return Recipe(base, tuple(models), method.name, params, dtype, output, dict(data), hub, classify)


def parse_hub(data: Any) -> HubTarget:
    """The ``hub:`` section: repo_id (required), private, revision (a branch), commit_message."""
    if not isinstance(data, dict):
        raise MergeError(f"hub: expected a mapping with repo_id (and optional private, revision, commit_message), got {data!r}")
    _unknown(data, HUB_KEYS, "hub.")
    repo_id = data.get("repo_id")
    if not isinstance(repo_id, str) or not REPO_ID.match(repo_id.strip()):
        raise MergeError(f"hub.repo_id: expected a Hub repository id such as 'user/model-name', got {repo_id!r}")
    private = data.get("private", False)
    if not isinstance(private, bool):
        raise MergeError(f"hub.private: expected true or false, got {private!r}")
    texts = {}
    for key in ("revision", "commit_message"):
        value = data.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise MergeError(f"hub.{key}: expected a non-empty string, got {value!r}")
        texts[key] = value.strip() if value is not None else None
    return HubTarget(repo_id.strip(), private, texts["revision"], texts["commit_message"])


def parse_classify(data: Any) -> ClassifyConfig:
    """Validate the `classify` section (corpora per category, top-k, token and batch limits)."""
    if not isinstance(data, dict):
        raise MergeError(f"classify: expected a mapping ({', '.join(CLASSIFY_KEYS)}), got {data!r}")
    _unknown(data, CLASSIFY_KEYS, "classify.")
    corpora_raw = data.get("corpora")
    if not isinstance(corpora_raw, dict) or not corpora_raw:
        raise MergeError("classify.corpora: expected a mapping of category: file (or list of files), "
                         f"with '{GENERAL_CATEGORY}' and one category per task")
    corpora: dict[str, tuple[str, ...]] = {}
    for cat, files in corpora_raw.items():
        if not isinstance(cat, str) or not CATEGORY_NAME.match(cat):
            raise MergeError(f"classify.corpora.{cat}: expected a category name (letters, digits, _ or -)")
        files = [files] if isinstance(files, str) else files
        if not isinstance(files, list) or not files or not all(isinstance(f, str) and f.strip() for f in files):
            raise MergeError(f"classify.corpora.{cat}: expected a file path or a non-empty list of file paths, got {files!r}")
        corpora[cat] = tuple(f.strip() for f in files)
    if GENERAL_CATEGORY not in corpora:
        raise MergeError(f"classify.corpora: missing the '{GENERAL_CATEGORY}' category (allowed: "
                         f"'{GENERAL_CATEGORY}' plus one category per task)")
    if len(corpora) < 2:
        raise MergeError(f"classify.corpora: needs at least one task category besides '{GENERAL_CATEGORY}'")
    ordered = {GENERAL_CATEGORY: corpora.pop(GENERAL_CATEGORY), **corpora}
    values: dict[str, Any] = {}
    for p in CLASSIFY_PARAMS:
        value = data.get(p.name, p.default)
        try:
            values[p.name] = None if value is None and p.default is None else p.check(value)
        except ValueError as exc:
            raise MergeError(f"classify.{p.name}: {exc}") from None
    output = data.get("output")
    if output is not None and (not isinstance(output, str) or not output.strip()):
        raise MergeError(f"classify.output: expected a file path, got {output!r}")
    return ClassifyConfig(ordered, output=output, **values)


def _check_categories(models: list[ModelEntry], method: str, uses: bool, classify: ClassifyConfig | None) -> None:
    """Model categories: only for methods that use them, distinct, and among the classified ones."""
    seen: dict[str, int] = {}
    for i, m in enumerate(models):
        if m.category is None:
            continue
        if not uses:
            raise MergeError(f"models[{i}].category: method '{method}' does not use categories (neuronmerge does)")
        if m.category == GENERAL_CATEGORY:
            raise MergeError(f"models[{i}].category: '{GENERAL_CATEGORY}' is not a task category")
        if m.category in seen:
            raise MergeError(f"models[{i}].category: '{m.category}' is already the category of models[{seen[m.category]}]")
        if classify is not None and m.category not in classify.corpora:
            raise MergeError(f"models[{i}].category: '{m.category}' has no corpus in classify.corpora "
                             f"(categories: {', '.join(classify.categories)})")
        seen[m.category] = i


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MergeError(f"{p}: no such recipe file") from None
    except UnicodeDecodeError:
        raise MergeError(f"{p}: not a recipe (not UTF-8 text)") from None
    except OSError as exc:
        raise MergeError(f"{p}: cannot read recipe ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise MergeError(f"{p}: malformed YAML{where}: {problem}") from None
    except RecursionError:
        raise MergeError(f"{p}: malformed YAML: nested too deeply") from None
    except Exception as exc:  # the YAML constructors raise ValueError, AttributeError, ... on bad scalars
        raise MergeError(f"{p}: malformed YAML: {type(exc).__name__}: {exc}") from None
    return parse_recipe(data, str(p))
