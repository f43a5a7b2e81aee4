"""Exemplar corpora for `neuromerge classify`: one list of texts per category.

A corpus file is either JSONL (``.jsonl``: one JSON object per line with a string field
``text``) or plain text (any other name: exemplars separated by blank lines, so that an
exemplar may span several lines, e.g. a function of source code).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import MergeError

BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")


@dataclass(frozen=True)
class Exemplar:
    """One exemplar text and the index of its category."""

    category: int
    text: str


def read_exemplars(path: str | Path) -> list[str]:
    """The exemplars of one corpus file (empty ones skipped)."""
    p = Path(path)
    try:
        raw = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MergeError(f"{p}: no such corpus file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MergeError(f"{p}: cannot read corpus ({exc.__class__.__name__}: {exc})") from None
    if p.suffix.lower() != ".jsonl":
        return [t.strip() for t in BLANK_LINES.split(raw.replace("\r\n", "\n")) if t.strip()]
    texts = []
    for n, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise MergeError(f"{p}:{n}: not valid JSON (a .jsonl corpus has one object with 'text' per line)") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise MergeError(f"{p}:{n}: expected an object with a string field 'text'")
        if row["text"].strip():
            texts.append(row["text"])
    return texts


def load_corpora(corpora: dict[str, tuple[str, ...]], max_exemplars: int | None = None) -> list[Exemplar]:
    """Every exemplar of every category, in category order then file order (this order breaks
    score ties); at most ``max_exemplars`` per category (the first ones)."""
    out: list[Exemplar] = []
    for code, (category, files) in enumerate(corpora.items()):
        texts = [t for f in files for t in read_exemplars(f)]
        if not texts:
            raise MergeError(f"classify.corpora.{category}: no exemplars in {', '.join(files)}")
        out.extend(Exemplar(code, t) for t in texts[:max_exemplars])
    return out
