"""Exemplar corpora: blank-line separated text and JSONL."""

from __future__ import annotations

from pathlib import Path

import pytest

from neuromerge_cli.corpora import load_corpora, read_exemplars
from neuromerge_cli.errors import MergeError


def test_text_is_split_on_blank_lines(tmp_path: Path) -> None:
    p = tmp_path / "code.py.txt"
    p.write_text("def f(x):\n    return x\n\n  \n\ndef g():\n    pass\r\n\r\nlast\n")
    assert read_exemplars(p) == ["def f(x):\n    return x", "def g():\n    pass", "last"]


def test_jsonl_text_field(tmp_path: Path) -> None:
    p = tmp_path / "m.jsonl"
    p.write_text('{"text": "1 + 1 = 2", "id": 1}\n\n{"text": "two\\n\\nlines"}\n{"text": "  "}\n')
    assert read_exemplars(p) == ["1 + 1 = 2", "two\n\nlines"]
    p.write_text('{"text": 1}\n')
    with pytest.raises(MergeError, match=r"m.jsonl:1: expected an object with a string field 'text'"):
        read_exemplars(p)
    p.write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(MergeError, match=r"m.jsonl:2: not valid JSON"):
        read_exemplars(p)


def test_load_corpora_orders_and_caps(tmp_path: Path) -> None:
    (tmp_path / "g.txt").write_text("a\n\nb\n\nc\n")
    (tmp_path / "m.txt").write_text("x\n\ny\n")
    (tmp_path / "empty.txt").write_text("\n\n")
    ex = load_corpora({"general": (str(tmp_path / "g.txt"),), "math": (str(tmp_path / "m.txt"), str(tmp_path / "g.txt"))}, 3)
    assert [(e.category, e.text) for e in ex] == [(0, "a"), (0, "b"), (0, "c"), (1, "x"), (1, "y"), (1, "a")]
    with pytest.raises(MergeError, match=r"classify.corpora.math: no exemplars"):
        load_corpora({"general": (str(tmp_path / "g.txt"),), "math": (str(tmp_path / "empty.txt"),)})
    with pytest.raises(MergeError, match=r"nope.txt: no such corpus file"):
        load_corpora({"general": (str(tmp_path / "nope.txt"),)})
