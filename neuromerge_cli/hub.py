"""The model card written with every merge, and pushing a merged folder to the Hub."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from .engine import Prepared


def model_card(prepared: "Prepared", report: dict[str, Any]) -> str:
    """README.md with Hub front matter (base_model, tags, library) and the recipe to reproduce."""
    recipe = prepared.recipe
    base = prepared.base.source
    front = {
        "base_model": base.reference,
        "tags": ["merge", "neuromerge", recipe.method],
        "library_name": "transformers",
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# Merged model ({recipe.method})", "",
             f"Made with [neuromerge](https://pypi.org/project/neuromerge/) {report['neuromerge_version']} "
             f"by merging {len(recipe.models)} fine-tuned models of `{base.reference}`.", "",
             "## Inputs", ""]
    lines.append(f"- base: `{base.reference}`" + (f" (revision `{base.revision}`)" if base.revision else ""))
    for ck, m in zip(prepared.tasks, recipe.models):
        rev = f" (revision `{ck.source.revision}`)" if ck.source.revision else ""
        lines.append(f"- `{m.model}`{rev}, weight {m.weight:g}")
    lines += ["", "## Method", "", f"`{recipe.method}` with " +
              ", ".join(f"{k}={v}" for k, v in recipe.params.items()) + "."]
    g = report["global"]
    if report["tasks"] and "sigma" in report["tasks"][0]:
        lines += ["", "| model | σ_t (L1 share trimmed) | kept fraction |", "|---|---|---|"]
        lines += [f"| `{r['model']}` | {r['sigma']:.4f} | {r.get('kept_fraction', float('nan')):.4f} |" for r in report["tasks"]]
    if "lambda2" in g:
        lines += ["", f"λ1 = {g['lambda1']:.4g}, λ2 = {g['lambda2']:.4g}" + (" (auto: 1/(1 − max σ_t))" if g.get("lambda2_auto") else "")]
    lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(recipe.raw, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)
