"""scripts/quality_benchmark.py on a tiny BERT family: merges through the CLI, scoring, caching, the table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import quality_benchmark as qb  # noqa: E402
from finetune import Head, save_head  # noqa: E402
import task_data  # noqa: E402

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film", "very", "dull", "a", "plot", "news"]
TASKS = ("rotten_tomatoes", "bbc_news")  # real names, fake data: subprocesses find them through the env


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A data cache with two small fake tasks; BENCH/models with a tiny base, two 'fine-tuned' encoders, heads."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    bench = tmp_path_factory.mktemp("bench")
    data = tmp_path_factory.mktemp("data")
    (data / "tasks").mkdir()
    texts = [f"{a} {b} {c}" for a in WORDS[5:9] for b in WORDS[9:] for c in ("film", "plot", "news")][:40]
    for i, name in enumerate(TASKS):
        examples = [[t, (j + i) % 2] for j, t in enumerate(texts)]
        (data / "tasks" / f"{name}.json").write_text(json.dumps({"labels": ["no", "yes"], "examples": examples}))
    root = bench / "models"
    vocab = bench / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=32)
    base = BertModel(config).eval()
    for name in ("base",) + TASKS:
        model = base
        if name != "base":
            model = BertModel(config).eval()
            model.load_state_dict(base.state_dict())
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.3 * torch.randn_like(p))
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        if name != "base":
            (root / name / "finetune.json").write_text(json.dumps({"hash": f"hash-{name}"}))
            save_head(root / "heads" / f"{name}.safetensors", Head(torch.randn(2, 8), torch.randn(2), ("no", "yes"), 8))
    return bench, data


@pytest.fixture
def bench(family, monkeypatch):
    path, data = family
    monkeypatch.setenv("NEUROMERGE_BENCH_CACHE", str(path))
    monkeypatch.setenv("NEUROMERGE_DATA_CACHE", str(data))
    monkeypatch.setattr(qb, "BENCH", path)
    monkeypatch.setattr(task_data, "CACHE", data)
    return path


def test_task_arithmetic_with_lambda_zero_scores_like_the_base_and_is_cached(bench, monkeypatch):
    tasks = ("rotten_tomatoes", "bbc_news")
    base = qb.folder_scores(bench / "models" / "base", "test", tasks)
    merged = qb.merged_scores(qb.Merge("task_arithmetic", {"lambda": 0.0}, tasks), "test", tasks)
    assert merged["accuracy"] == base
    assert merged["merge"]["method"] == "task_arithmetic"
    assert not any((bench / "work").iterdir())  # the merged folder is dropped after scoring
    monkeypatch.setattr(qb.subprocess, "run", lambda *a, **k: pytest.fail("cached: no merge expected"))
    assert qb.merged_scores(qb.Merge("task_arithmetic", {"lambda": 0.0}, tasks), "test", tasks) == merged


def test_one_model_linear_merge_scores_like_that_model(bench):
    merged = qb.merged_scores(qb.Merge("linear", {}, ("rotten_tomatoes",)), "validation", ("rotten_tomatoes",))
    assert merged["accuracy"] == qb.evaluate(bench / "models" / "rotten_tomatoes", "validation", ("rotten_tomatoes",))


def test_merge_failure_names_the_merge(bench):
    with pytest.raises(RuntimeError, match="neuromerge run failed"):
        qb.merged_scores(qb.Merge("ties", {"density": 7}, ("rotten_tomatoes", "bbc_news")), "test", ("rotten_tomatoes", "bbc_news"))


def test_merge_key_depends_on_method_parameters_models_and_their_hashes(bench):
    key = qb.Merge("ties", {"density": 0.2}, ("rotten_tomatoes", "bbc_news")).key()
    assert key == qb.Merge("ties", {"density": 0.2}, ("rotten_tomatoes", "bbc_news")).key()
    assert key != qb.Merge("ties", {"density": 0.1}, ("rotten_tomatoes", "bbc_news")).key()
    assert key != qb.Merge("dare_ties", {"density": 0.2}, ("rotten_tomatoes", "bbc_news")).key()
    assert key != qb.Merge("ties", {"density": 0.2}, ("rotten_tomatoes",)).key()


def test_table_mean_and_normalized_accuracy(monkeypatch):
    monkeypatch.setattr(qb, "TASKS", ("rotten_tomatoes", "bbc_news"))
    fine = {"rotten_tomatoes": 0.8, "bbc_news": 0.5}
    rows = [qb.Row("fine-tuned", dict(fine)), qb.Row("m", {"rotten_tomatoes": 0.4, "bbc_news": 0.5}, note="d=0.1"),
            qb.Row("one task", {"bbc_news": 0.25})]
    lines = qb.table(rows, fine).splitlines()
    assert lines[0] == "| row | RT | BBC | mean acc | normalized |"
    assert lines[2] == "| fine-tuned | 0.800 | 0.500 | 0.650 | 1.000 |"
    assert lines[3] == "| m (d=0.1) | 0.400 | 0.500 | 0.450 | 0.750 |"
    assert lines[4] == "| one task |  | 0.250 | 0.250 | 0.500 |"


def test_eval_command_prints_the_mean_as_its_last_line(bench, capsys):
    qb.main(["eval", str(bench / "models" / "rotten_tomatoes"), "--split", "validation", "--tasks", "rotten_tomatoes,bbc_news"])
    lines = capsys.readouterr().out.strip().splitlines()
    scores = qb.evaluate(bench / "models" / "rotten_tomatoes", "validation", ("rotten_tomatoes", "bbc_news"))
    assert lines[:2] == [f"{t}: {scores[t]:.4f}" for t in TASKS]
    assert float(lines[-1]) == pytest.approx(sum(scores.values()) / 2, abs=1e-6)


def test_tuned_row_picks_the_best_validation_point_of_a_sweep(bench):
    tasks = ("rotten_tomatoes", "bbc_news")
    row, points = qb.tuned_row("ta tuned", "task_arithmetic", {"lambda": [0.0, 1.0]}, tasks)
    val = {lam: qb.merged_scores(qb.Merge("task_arithmetic", {"lambda": lam}, tasks), "validation", tasks)["accuracy"]
           for lam in (0.0, 1.0)}
    means = {lam: sum(v.values()) / 2 for lam, v in val.items()}
    assert [(p["lambda"], pytest.approx(p["validation_mean"])) for p in points] == [(lam, means[lam]) for lam in (0.0, 1.0)]
    best = max((0.0, 1.0), key=lambda lam: (means[lam], -lam))
    assert row.note == f"lambda={best}"
    assert row.accuracy == qb.merged_scores(qb.Merge("task_arithmetic", {"lambda": best}, tasks), "test", tasks)["accuracy"]
