"""`neuromerge report`: merge_report.json as rich tables, and its per-tensor figures grouped by layer.

Per-tensor keys a method may add (NeuroMerging does; baselines add only some or none):
``sign_conflict`` (rate of the elections), ``mean_orthogonal_rank``, ``parallel_share`` and
``orthogonal_share`` (per task ‖part‖²/‖τ_t‖²). Every view skips what a report lacks.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import MergeError
from .report import REPORT_NAME
from .units import format_bytes, format_duration

# Per-tensor metrics: the report key, then older or alternative spellings.
METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "sign_conflict": ("sign_conflict",),
    "rank": ("mean_orthogonal_rank", "orthogonal_rank", "mean_rank"),
    "parallel": ("parallel_share", "parallel_energy_share", "parallel_energy"),
    "orthogonal": ("orthogonal_share", "orthogonal_energy_share", "orthogonal_energy"),
}
LAYER = re.compile(r"^(?P<stack>.*?)\.(?P<index>\d+)\.")


def load_report(path: Path) -> dict[str, Any]:
    """A merge_report.json, given as the file or the merge output folder."""
    file = path / REPORT_NAME if path.is_dir() else path
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MergeError(f"{file}: no such report (give merge_report.json or a merge output folder)") from None
    except OSError as exc:
        raise MergeError(f"{file}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError):
        raise MergeError(f"{file}: not valid JSON") from None
    if not isinstance(report, dict) or not isinstance(report.get("tensors"), dict) or "method" not in report:
        raise MergeError(f"{file}: not a merge report (expected 'method' and 'tensors')")
    return report


def metric(entry: dict[str, Any], name: str) -> float | None:
    """A per-tensor metric as one number (a per-task list becomes its mean), or None if absent."""
    for key in METRIC_KEYS[name]:
        value = entry.get(key)
        if isinstance(value, list) and value:
            return sum(float(v) for v in value) / len(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _per_task(entry: dict[str, Any], name: str) -> list[float] | None:
    for key in METRIC_KEYS[name]:
        value = entry.get(key)
        if isinstance(value, list):
            return [float(v) for v in value]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return [float(value)]
    return None


def layer_of(name: str) -> tuple[str, int] | None:
    """('model.layers', 12) for 'model.layers.12.mlp.up_proj.weight'; None outside numbered blocks."""
    m = LAYER.match(name)
    return (m["stack"], int(m["index"])) if m else None


@dataclass
class LayerStats:
    """The merged tensors of one layer, summarised (shares energy-weighted, rates entry-weighted)."""

    stack: str
    index: int
    tensors: int = 0
    parallel: float | None = None
    orthogonal: float | None = None
    sign_conflict: float | None = None
    rank: float | None = None
    delta_norm: float = 0.0
    task_norms: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.stack}.{self.index}"


class _Mean:
    """A weighted mean that stays None until something is added."""

    def __init__(self) -> None:
        self.total = self.weight = 0.0

    def add(self, value: float, weight: float) -> None:
        self.total += value * weight
        self.weight += weight

    def value(self) -> float | None:
        return self.total / self.weight if self.weight > 0 else None


def by_layer(report: dict[str, Any]) -> tuple[list[LayerStats], int]:
    """Per-layer figures in depth order (stacks in order of appearance), and how many merged
    tensors sit outside numbered layers (embeddings, final norms, heads).

    Energy shares are weighted by each task's ‖τ_t‖² of the tensor, the sign-conflict rate by
    entries, the orthogonal rank by rows; norms add in quadrature (the layer's whole delta).
    """
    groups: dict[tuple[str, int], list[tuple[str, dict[str, Any]]]] = {}
    outside = 0
    for name, entry in report["tensors"].items():
        key = layer_of(name)
        if key is None:
            outside += 1
        else:
            groups.setdefault(key, []).append((name, entry))
    stacks = list(dict.fromkeys(stack for stack, _ in groups))
    rows = []
    for stack, index in sorted(groups, key=lambda k: (stacks.index(k[0]), k[1])):
        entries = groups[(stack, index)]
        par, orth, conflict, rank = _Mean(), _Mean(), _Mean(), _Mean()
        delta2 = 0.0
        task2: list[float] = []
        for _, e in entries:
            shape = e.get("shape") or []
            numel = math.prod(shape) if shape else 1
            l2 = [float(x) for x in e.get("task_l2", [])]
            for mean, key in ((par, "parallel"), (orth, "orthogonal")):
                shares = _per_task(e, key)
                if shares is not None:
                    weights = [x * x for x in l2] if len(l2) == len(shares) else [1.0] * len(shares)
                    for s, w in zip(shares, weights):
                        mean.add(s, w)
            c = metric(e, "sign_conflict")
            if c is not None:
                conflict.add(c, numel)
            r = metric(e, "rank")
            if r is not None:
                rank.add(r, shape[0] if shape else 1)
            delta2 += float(e.get("delta_norm", 0.0)) ** 2
            task2 = [a + b * b for a, b in zip(task2, l2)] if task2 else [b * b for b in l2]
        rows.append(LayerStats(stack, index, len(entries), par.value(), orth.value(), conflict.value(),
                               rank.value(), math.sqrt(delta2), [math.sqrt(x) for x in task2]))
    return rows, outside


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "–" if value is None else format(value, spec)


def _short(ref: str) -> str:
    return ref if len(ref) <= 48 else "…" + ref[-47:]


def render(report: dict[str, Any], console: Console, top: int = 10, layers: bool = False) -> None:
    """Print the report: overview, per-task trim, global scales, top tensors (and per layer)."""
    inputs, totals = report.get("inputs", {}), report.get("totals", {})
    params = ", ".join(f"{k}={v}" for k, v in report.get("parameters", {}).items())
    console.print(f"[bold]{escape(str(report['method']))}[/bold]" + escape(f" ({params})" if params else "")
                  + escape(f" on {report.get('device', '?')}, neuromerge {report.get('neuromerge_version', '?')}"),
                  highlight=False, soft_wrap=True)
    if totals:
        console.print(f"{totals.get('merged_parameters', 0):,} of {totals.get('parameters', 0):,} parameters merged; "
                      f"{totals.get('tensors', 0)} tensors, {len(totals.get('tied', {}))} tied, "
                      f"{totals.get('shards', '?')} shard(s); read {format_bytes(totals.get('bytes_in', 0))}, "
                      f"wrote {format_bytes(totals.get('bytes_out', 0))}", highlight=False, soft_wrap=True)
    timings, peak = report.get("timings", {}), report.get("peak_memory", {})
    if timings:
        total_s = sum(v for k, v in timings.items() if k.endswith("_s"))
        mem = f", peak RSS {format_bytes(peak['rss_bytes'])}" if "rss_bytes" in peak else ""
        console.print(f"took {format_duration(total_s)} ({total_s:.1f} s){mem}", highlight=False, soft_wrap=True)
    console.print()
    _tasks_table(report, inputs, console)
    g = report.get("global", {})
    scales = [f"{label} = {float(g[k]):.4g}" for k, label in
              (("sigma", "σ = max σ_t"), ("lambda1", "λ1"), ("lambda2", "λ2"), ("lambda_point", "λ points"))
              if isinstance(g.get(k), (int, float)) and not isinstance(g.get(k), bool)]
    if scales:
        console.print(", ".join(scales) + (" (λ2 automatic: 1/(1 − σ))" if g.get("lambda2_auto") else ""),
                      highlight=False, soft_wrap=True)
        console.print()
    tensors = report["tensors"]
    for title, key in (("sign conflict", "sign_conflict"), ("mean orthogonal rank", "rank"), ("delta norm", None)):
        if key is None:
            ranked = sorted(tensors.items(), key=lambda kv: -float(kv[1].get("delta_norm", 0.0)))
        else:
            ranked = sorted(((n, e) for n, e in tensors.items() if metric(e, key) is not None),
                            key=lambda kv: -metric(kv[1], key))  # type: ignore[operator]
        if not ranked:
            console.print(f"(no per-tensor {title} in this report)", style="dim")
            continue
        console.print(_tensor_table(f"top {min(top, len(ranked))} tensors by {title}", ranked[:top]))
    if layers:
        rows, outside = by_layer(report)
        console.print(_layer_table(rows, outside))


def _tasks_table(report: dict[str, Any], inputs: dict[str, Any], console: Console) -> None:
    table = Table(title="inputs", title_justify="left")
    base = inputs.get("base", {})
    rows = report.get("tasks", [])
    models = inputs.get("models", [{}] * len(rows))
    keys = [k for k in ("sigma", "threshold", "kept_fraction") if any(k in r for r in rows)]
    for col in ["model", "revision", "weight", *(("σ_t" if k == "sigma" else k.replace("_", " ")) for k in keys)]:
        table.add_column(col, justify="left" if col in ("model", "revision") else "right",
                         overflow="fold" if col == "model" else "ellipsis")
    table.add_row(escape(_short(str(base.get("reference", "?")))) + " (base)", (base.get("revision") or "local")[:12], "",
                  *[""] * len(keys))
    for row, m in zip(rows, models):
        table.add_row(escape(_short(str(row.get("model", m.get("reference", "?"))))), (m.get("revision") or "local")[:12],
                      _fmt(m.get("weight")), *[_fmt(row.get(k)) if row.get(k) is not None else "per tensor" for k in keys])
    console.print(table)
    console.print()


def _tensor_table(title: str, rows: list[tuple[str, dict[str, Any]]]) -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("tensor", "role", "shape", "sign conflict", "⊥ rank", "∥ share", "⊥ share", "delta norm"):
        table.add_column(col, justify="left" if col in ("tensor", "role", "shape") else "right",
                         overflow="fold" if col == "tensor" else "ellipsis")  # a name is never cut short
    for name, e in rows:
        table.add_row(escape(name), str(e.get("role", "")), "×".join(str(s) for s in e.get("shape", [])),
                      _fmt(metric(e, "sign_conflict"), ".1%"), _fmt(metric(e, "rank"), ".2f"),
                      _fmt(metric(e, "parallel"), ".1%"), _fmt(metric(e, "orthogonal"), ".1%"),
                      _fmt(e.get("delta_norm")))
    return table


def _layer_table(rows: list[LayerStats], outside: int) -> Table:
    caption = f"{outside} merged tensor(s) outside numbered layers not shown" if outside else None
    table = Table(title="per layer", title_justify="left", caption=caption)
    for col in ("layer", "tensors", "∥ share", "⊥ share", "sign conflict", "⊥ rank", "delta norm"):
        table.add_column(col, justify="left" if col == "layer" else "right", overflow="fold" if col == "layer" else "ellipsis")
    for r in rows:
        table.add_row(r.label, str(r.tensors), _fmt(r.parallel, ".1%"), _fmt(r.orthogonal, ".1%"),
                      _fmt(r.sign_conflict, ".1%"), _fmt(r.rank, ".2f"), _fmt(r.delta_norm))
    return table
