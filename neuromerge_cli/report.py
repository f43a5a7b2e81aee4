"""merge_report.json, the metadata files written beside the weights, and the run summary."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__, kernels
from .checkpoints import META_PATTERNS

if TYPE_CHECKING:
    from .engine import Prepared

REPORT_NAME = "merge_report.json"


def build_report(prepared: "Prepared", method_report: dict[str, Any], tensors: dict[str, dict[str, Any]],
                 device: str, timings: dict[str, float], peak: dict[str, int]) -> dict[str, Any]:
    """The report: recipe, resolved inputs, global figures, per-task and per-tensor statistics."""
    recipe, plan = prepared.recipe, prepared.plan
    models = [{**ck.source.describe(), "weight": m.weight} for ck, m in zip(prepared.tasks, recipe.models)]
    trim = method_report.get("trim", {})
    tasks = []
    for i, m in enumerate(models):
        row: dict[str, Any] = {"model": m["reference"]}
        for key in ("sigma", "threshold", "kept_fraction"):
            if trim.get(key) is not None:
                row[key] = trim[key][i]
        tasks.append(row)
    merged_params = sum(_numel(t.shape) for t in plan.merged)
    return {
        "neuromerge_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "recipe": recipe.raw,
        "method": recipe.method,
        "parameters": recipe.params,
        "inputs": {"base": prepared.base.source.describe(), "models": models},
        "device": device,
        "cpu_sweeps": kernels.cpu_sweeps() if device.startswith("cpu") else None,
        "global": method_report,
        "tasks": tasks,
        "totals": {
            "tensors": len(plan.tensors),
            "parameters": sum(_numel(t.shape) for t in plan.tensors),
            "merged_parameters": merged_params,
            "tied": plan.tied,
            "bytes_in": plan.bytes_in,
            "bytes_out": plan.bytes_out,
            "shards": len(plan.shards),
        },
        "tensors": tensors,
        "timings": timings,
        "peak_memory": peak,
    }


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _metadata_files(base: Path) -> list[Path]:
    """The base's config, tokenizer and generation files that are copied next to the weights."""
    return [src for pattern in META_PATTERNS for src in base.glob(pattern) if src.is_file()]


def metadata_bytes(base: Path) -> int:
    """What the copied metadata files take on disk (for the free-space check)."""
    return sum(src.stat().st_size for src in _metadata_files(base))


def write_metadata(folder: Path, prepared: "Prepared", report: dict[str, Any]) -> None:
    """config.json (dtype updated), tokenizer and generation files, model card, report."""
    from .hub import model_card

    base = prepared.base.path
    for src in _metadata_files(base):
        if src.name != "config.json":
            shutil.copy2(src, folder / src.name)
    if prepared.base.config is not None:
        config = dict(prepared.base.config)
        if prepared.recipe.dtype is not None:
            dtype = str(prepared.recipe.torch_dtype).removeprefix("torch.")
            keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
            for k in keys:
                config[k] = dtype
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "README.md").write_text(model_card(report))
    (folder / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")


def summary_lines(report: dict[str, Any], top: int = 5) -> list[str]:
    """A few human lines about a finished merge."""
    totals, timings = report["totals"], report["timings"]
    lines = [
        f"method {report['method']}: {totals['merged_parameters']:,} of {totals['parameters']:,} parameters merged "
        f"from {len(report['inputs']['models'])} models on {report['device']}",
    ]
    if report.get("cpu_sweeps") not in (None, "C kernels"):
        lines.append(f"  CPU sweeps: {report['cpu_sweeps']}")
    for row in report["tasks"]:
        parts = [f"{k}={row[k]:.4g}" for k in ("sigma", "threshold", "kept_fraction") if k in row]
        if parts:
            lines.append(f"  {row['model']}: " + ", ".join(parts))
    g = report["global"]
    if "lambda2" in g:
        sigma = f"sigma=max σ_t={g['sigma']:.4g} " if "sigma" in g else ""
        lines.append(f"  {sigma}lambda1={g['lambda1']:.4g} lambda2={g['lambda2']:.4g}"
                     + (" (auto)" if g.get("lambda2_auto") else ""))
    conflicts = sorted(((v["sign_conflict"], k) for k, v in report["tensors"].items() if "sign_conflict" in v), reverse=True)
    if conflicts:
        lines.append("  most sign conflict: " + ", ".join(f"{k} ({c:.1%})" for c, k in conflicts[:top]))
    total_s = sum(v for k, v in timings.items() if k.endswith("_s"))
    lines.append(f"  {total_s:.1f} s, peak RSS {report['peak_memory']['rss_bytes'] / 2**30:.2f} GiB, "
                 f"{timings.get('statistics_reads', 0)} statistics read(s) + 1 merge read")
    return lines
