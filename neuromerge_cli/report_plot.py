"""`neuromerge report --plot out.png`: per-layer figures of a merge across depth (needs matplotlib)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

from .errors import MergeError
from .report_render import LayerStats, by_layer


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise MergeError("--plot needs matplotlib: pip install 'neuromerge[plot]'") from None
    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def plot_layers(report: dict[str, Any], path: Path) -> int:
    """Draw four panels across depth and save them to ``path``; returns the number of layers drawn.

    Panels: parallel / orthogonal energy share, sign-conflict rate, mean orthogonal rank, and the
    norms of the merged delta and of each task vector. A panel whose figure the report lacks says so.
    """
    rows, outside = by_layer(report)
    if not rows:
        raise MergeError("--plot: no tensor names with a layer number (like model.layers.12.…) in this report")
    plt = _pyplot()
    x = list(range(len(rows)))
    fig, axes = plt.subplots(4, 1, figsize=(max(7.0, 0.28 * len(rows) + 3), 11), sharex=True)
    _shares(axes[0], x, rows)
    _line(axes[1], x, rows, [r.sign_conflict for r in rows], "sign-conflict rate", "sign conflicts of the elections",
          percent=True, color="tab:red")
    _line(axes[2], x, rows, [r.rank for r in rows], "mean ⊥ rank", "mean orthogonal rank per neuron", color="tab:purple")
    _norms(axes[3], x, rows, [m.get("reference", f"task {i + 1}") for i, m in
                              enumerate(report.get("inputs", {}).get("models", []))])
    _stack_marks(axes, rows)
    step = max(1, len(rows) // 24)
    axes[-1].set_xticks(x[::step])
    axes[-1].set_xticklabels([str(r.index) for r in rows][::step])
    axes[-1].set_xlabel("layer" + (f"   ({outside} tensors outside numbered layers not shown)" if outside else ""))
    params = ", ".join(f"{k}={v}" for k, v in report.get("parameters", {}).items() if v is not None)
    title = f"{report['method']} ({params})" if params else str(report["method"])
    fig.suptitle(textwrap.fill(title, 90), fontsize=10)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise MergeError(f"{path}: cannot write the plot ({exc.strerror or exc})") from None
    finally:
        plt.close(fig)
    return len(rows)


def _plot(ax: Any, x: list[int], values: list[float | None], rows: list[LayerStats], **style: Any) -> None:
    """One line per stack (an encoder's last layer does not lead into the decoder's first); gaps skipped."""
    label = style.pop("label", None)
    start = 0
    for end in range(1, len(rows) + 1):
        if end < len(rows) and rows[end].stack == rows[start].stack:
            continue
        points = [(x[i], values[i]) for i in range(start, end) if values[i] is not None]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], label=label, **style)
            label = None  # one legend entry per series
        start = end


def _missing(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in this report", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_yticks([])


def _shares(ax: Any, x: list[int], rows: list[LayerStats]) -> None:
    """Both shares on a log axis: the parallel one is often a few percent, and its changes matter."""
    ax.set_ylabel("energy share")
    ax.set_title("parallel / orthogonal energy of the task vectors (‖part‖² / ‖τ‖², log scale)", fontsize=9, loc="left")
    if all(r.parallel is None and r.orthogonal is None for r in rows):
        _missing(ax, "parallel/orthogonal split")
        return
    floor = 1e-4  # a share of 0 is drawn at 0.01 %
    lowest = 1.0
    for key, color, label in (("parallel", "tab:blue", "parallel ∥"), ("orthogonal", "tab:orange", "orthogonal ⊥")):
        values = [None if getattr(r, key) is None else max(getattr(r, key), floor) * 100 for r in rows]
        lowest = min([lowest] + [v / 100 for v in values if v is not None])
        _plot(ax, x, values, rows, marker="o", ms=3, color=color, label=label)
    ax.set_yscale("log")
    ax.set_ylim(10 ** math.floor(math.log10(lowest * 100)), 150)  # whole decades, so that labels show
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:g}%")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="center right", fontsize=8)


def _line(ax: Any, x: list[int], rows: list[LayerStats], values: list[float | None], label: str, title: str, percent: bool = False,
          color: str = "tab:blue") -> None:
    ax.set_ylabel(label)
    ax.set_title(title, fontsize=9, loc="left")
    if all(v is None for v in values):
        _missing(ax, label)
        return
    _plot(ax, x, [None if v is None else v * (100 if percent else 1) for v in values], rows,
          marker="o", ms=3, color=color)
    if percent:
        ax.yaxis.set_major_formatter(lambda v, _: f"{v:g}%")
    ax.grid(alpha=0.3)


def _norms(ax: Any, x: list[int], rows: list[LayerStats], names: list[str]) -> None:
    ax.set_ylabel("L2 norm")
    ax.set_title("norm of the merged delta and of each task vector", fontsize=9, loc="left")
    _plot(ax, x, [r.delta_norm for r in rows], rows, marker="o", ms=3, color="black", label="merged delta")
    tasks = max((len(r.task_norms) for r in rows), default=0)
    for t in range(tasks):
        label = names[t] if t < len(names) else f"task {t + 1}"
        label = label if len(label) <= 30 else "…" + label[-29:]
        _plot(ax, x, [r.task_norms[t] if t < len(r.task_norms) else None for r in rows], rows,
              lw=1, alpha=0.7, color=f"C{t % 10}", label=label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)


def _stack_marks(axes: Any, rows: list[LayerStats]) -> None:
    """Separate and name the stacks of an encoder-decoder (encoder.block.*, decoder.block.*)."""
    starts = [i for i, r in enumerate(rows) if i == 0 or r.stack != rows[i - 1].stack]
    if len(starts) < 2:
        return
    for ax in axes:
        for i in starts[1:]:
            ax.axvline(i - 0.5, color="gray", lw=0.8, ls="--")
    for i in starts:
        axes[0].text(i - 0.4, 1.02, rows[i].stack, fontsize=8, color="gray", va="bottom")
