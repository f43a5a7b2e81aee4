"""The model card written with every merge, and pushing a merged folder to the Hugging Face Hub."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml

from .checkpoints import HUB_ID, Source, open_checkpoint
from .errors import MergeError
from .report import REPORT_NAME
from .writer import INDEX_NAME

CARD_NAME = "README.md"


# ----------------------------------------------------------------------------------------------
# The model card


def load_quality(path: str | Path) -> dict[str, dict[str, Any]]:
    """A quality table: a JSON object {row: {column: number or text}}, e.g.
    ``{"paws (accuracy)": {"base": 0.52, "merged": 0.90}}``."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise MergeError(f"{p}: cannot read quality table ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError):
        raise MergeError(f"{p}: quality table is not valid JSON") from None
    if not isinstance(data, dict) or not data:
        raise MergeError(f"{p}: quality table: expected a non-empty JSON object {{row: {{column: value}}}}")
    for row, cells in data.items():
        if not isinstance(cells, dict) or not cells:
            raise MergeError(f"{p}: quality table row '{row}': expected a non-empty object {{column: value}}")
        for col, value in cells.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise MergeError(f"{p}: quality table row '{row}', column '{col}': expected a number or text, got {value!r}")
    return data


def _hub_repo(source: dict[str, Any]) -> str | None:
    """The Hub repo id of an input (without @revision), or None for a local folder."""
    ref = str(source.get("reference", ""))
    repo = ref.partition("@")[0]
    return repo if source.get("source") == "hub" and HUB_ID.match(repo) else None


def _pinned(reference: str, source: dict[str, Any]) -> str:
    """``repo@commit`` for a Hub input whose commit was resolved, else the reference as written."""
    repo = _hub_repo(source)
    return f"{repo}@{source['revision']}" if repo and source.get("revision") else reference


def pinned_recipe(report: dict[str, Any]) -> dict[str, Any]:
    """The recipe as run, with every Hub input pinned to the commit it resolved to."""
    recipe = dict(report["recipe"])
    inputs = report["inputs"]
    recipe["base_model"] = _pinned(recipe["base_model"], inputs["base"])
    models = []
    for entry, source in zip(recipe.get("models", []), inputs["models"]):
        if isinstance(entry, dict):
            models.append({**entry, "model": _pinned(entry["model"], source)})
        else:
            models.append(_pinned(entry, source))
    recipe["models"] = models
    return recipe


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value).replace("|", "\\|")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def _title(base: dict[str, Any]) -> str:
    return _hub_repo(base) or Path(str(base["reference"])).name or str(base["reference"])


def _front_matter(report: dict[str, Any]) -> dict[str, Any]:
    front: dict[str, Any] = {}
    base = _hub_repo(report["inputs"]["base"])
    if base is not None:  # the Hub only accepts repo ids here; a local base is named in the text
        front["base_model"] = base
        front["base_model_relation"] = "merge"
    front["tags"] = list(dict.fromkeys(["merge", "neuromerge", report["method"]]))
    front["library_name"] = "transformers"
    return front


def model_card(report: dict[str, Any], quality: dict[str, dict[str, Any]] | None = None) -> str:
    """README.md: Hub front matter (base_model, tags, library_name), then inputs with their resolved
    revisions, method and parameters, σ_t / λ2 where the method has them, the quality table when
    one is given, and the recipe to reproduce the merge. Built from merge_report.json alone."""
    base, models = report["inputs"]["base"], report["inputs"]["models"]
    lines = ["---", yaml.safe_dump(_front_matter(report), sort_keys=False).strip(), "---", "",
             f"# {_title(base)} merged with {report['method']}", "",
             f"This model was made with neuromerge {report['neuromerge_version']} by merging {len(models)} "
             f"fine-tuned model(s) of `{base['reference']}` with the `{report['method']}` method, without training."]
    lines += _inputs_section(base, models) + _method_section(report)
    if quality:
        columns = list(dict.fromkeys(c for cells in quality.values() for c in cells))
        lines += ["", "## Quality", ""]
        lines += _table([""] + columns, [[row] + [cells.get(c, "") for c in columns] for row, cells in quality.items()])
    recipe = yaml.safe_dump(pinned_recipe(report), sort_keys=False, allow_unicode=True).strip()
    lines += ["", "## Reproduce", "", "Hub inputs are pinned to the commits that were merged.", "",
              "```yaml", recipe, "```", "", "```bash", "pip install neuromerge", "neuromerge run recipe.yaml", "```", "",
              f"Per-tensor statistics are in `{REPORT_NAME}` (`neuromerge report {REPORT_NAME}`).", ""]
    return "\n".join(lines)


def _inputs_section(base: dict[str, Any], models: list[dict[str, Any]]) -> list[str]:
    rows = [["base", f"`{base['reference']}`", base.get("revision") or "(local folder)", ""]]
    rows += [[f"model {i + 1}", f"`{m['reference']}`", m.get("revision") or "(local folder)", m.get("weight", 1.0)]
             for i, m in enumerate(models)]
    return ["", "## Inputs", ""] + _table(["role", "model", "revision", "weight"], rows)


SCALE_LABELS = {"sigma": "σ", "lambda1": "λ1", "lambda2": "λ2"}


def _method_section(report: dict[str, Any]) -> list[str]:
    """Parameters, then σ_t per task and σ, λ1, λ2 when the method reports them."""
    lines = ["", "## Method", "", f"`{report['method']}` with these parameters (defaults filled in):", ""]
    lines += _table(["parameter", "value"], [[k, v] for k, v in report.get("parameters", {}).items()])
    task_rows = [r for r in report.get("tasks", []) if "sigma" in r]
    if task_rows:
        lines += ["", "Trimming per task (σ_t: share of the task vector's L1 mass removed):", ""]
        lines += _table(["model", "σ_t", "threshold", "kept fraction"],
                        [[f"`{r['model']}`", r["sigma"], "per tensor" if r.get("threshold") is None else r["threshold"],
                          r.get("kept_fraction", "")] for r in task_rows])
    g = report.get("global", {})
    scales = [f"{label} = {_cell(float(g[k]))}" for k, label in SCALE_LABELS.items()
              if isinstance(g.get(k), (int, float)) and not isinstance(g.get(k), bool)]
    if scales:
        lines += ["", ", ".join(scales) + (" (λ2 = 1/(1 − σ), automatic)" if g.get("lambda2_auto") else "")]
    totals = report.get("totals", {})
    if totals:
        lines += ["", f"{totals.get('merged_parameters', 0):,} of {totals.get('parameters', 0):,} parameters merged "
                      f"({totals.get('tensors', 0)} tensors, {totals.get('shards', 1)} shard(s))."]
    return lines


# ----------------------------------------------------------------------------------------------
# Pushing


def check_folder(folder: Path) -> dict[str, Any]:
    """Refuse anything but a complete merge output; returns its report.

    Complete means: merge_report.json and README.md present and readable, every shard the index
    names present, every safetensors header intact and every indexed tensor in its shard, and as
    many tensors as the report says.
    """
    if not folder.is_dir():
        raise MergeError(f"{folder}: no such folder")
    report_path = folder / REPORT_NAME
    if not report_path.is_file():
        raise MergeError(f"{folder}: not a complete merge output (no {REPORT_NAME}); nothing pushed")
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
        expected = int(report["totals"]["tensors"])
        if not isinstance(report["inputs"]["base"], dict) or not isinstance(report["method"], str):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise MergeError(f"{report_path}: corrupted report (not the JSON a merge writes); nothing pushed") from None
    if not (folder / CARD_NAME).is_file():
        raise MergeError(f"{folder}: not a complete merge output (no {CARD_NAME}); nothing pushed")
    checkpoint = open_checkpoint(Source(str(folder), folder))  # checks the index, shards and headers
    index = folder / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        for name, shard in weight_map.items():
            info = checkpoint.tensors.get(name)
            if info is None or info.file.name != shard:
                raise MergeError(f"{index}: tensor '{name}' is not in shard '{shard}'; nothing pushed")
    if len(checkpoint.tensors) != expected:
        raise MergeError(f"{folder}: {len(checkpoint.tensors)} tensors, but {REPORT_NAME} says {expected}; nothing pushed")
    return report


def push_folder(folder: Path, repo_id: str, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, quality: dict[str, dict[str, Any]] | None = None) -> str:
    """Check ``folder`` and upload it to the Hub model repo ``repo_id``; returns the commit URL.

    The token comes from the usual places (HF_TOKEN, `huggingface-cli login`). The repo is created
    when missing, a ``revision`` branch is created from main when missing, and upload_folder sends
    large files through the Hub's large-file storage. With ``quality``, README.md is re-rendered
    with the quality table before the upload.
    """
    from huggingface_hub import HfApi

    report = check_folder(folder)
    if quality is not None:
        (folder / CARD_NAME).write_text(model_card(report, quality))
    api = HfApi()
    message = commit_message or f"Upload model merged with neuromerge ({report['method']})"
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                                   revision=revision, commit_message=message,
                                   ignore_patterns=[".*", "**/.*"])
    except MergeError:
        raise
    except Exception as exc:  # huggingface_hub raises HTTP, auth, offline and OS errors
        first = (str(exc).splitlines() or [""])[0]
        raise MergeError(f"hub: push of {folder} to '{repo_id}' failed ({exc.__class__.__name__}: {first})") from None
    return str(getattr(commit, "commit_url", None) or commit)
