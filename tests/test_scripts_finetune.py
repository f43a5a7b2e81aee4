"""scripts/finetune.py: the cheap parts (no training here): batches, pooling, hashing, heads, prediction."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import finetune  # noqa: E402
from finetune import FinetuneConfig, Head, config_hash, load_head, mean_pool, predict, save_head  # noqa: E402
from task_data import Example  # noqa: E402


def test_batches_are_seeded_and_cover_each_example_once_per_epoch():
    examples = [Example(f"t{i}", i % 3) for i in range(10)]
    batches = list(finetune._batches(examples, 4, 5, seed=1))  # 20 draws = two full epochs
    assert [len(b) for b in batches] == [4] * 5
    counts = Counter(e.text for b in batches for e in b)
    assert set(counts.values()) == {2}
    assert batches == list(finetune._batches(examples, 4, 5, seed=1))
    assert batches != list(finetune._batches(examples, 4, 5, seed=2))


def test_total_steps():
    assert FinetuneConfig(epochs=1.0, batch_size=16).total_steps(2000) == 125
    assert FinetuneConfig(epochs=1.0, batch_size=16, min_steps=100).total_steps(383) == 100
    assert FinetuneConfig(steps=7, min_steps=100).total_steps(2000) == 7


def test_mean_pool_ignores_padding():
    hidden = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    expected = torch.stack([hidden[0, :2].mean(0), hidden[1, 0]])
    assert torch.allclose(mean_pool(hidden, mask), expected)


def test_config_hash_changes_with_config_data_and_base(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"base weights")
    train = [Example("a", 0), Example("b", 1)]
    h = config_hash(FinetuneConfig(), tmp_path, "t", ("x", "y"), train)
    assert h == config_hash(FinetuneConfig(), tmp_path, "t", ("x", "y"), list(train))
    assert h != config_hash(FinetuneConfig(lr=1e-4), tmp_path, "t", ("x", "y"), train)
    assert h != config_hash(FinetuneConfig(), tmp_path, "t", ("x", "y"), train[:1])
    (tmp_path / "model.safetensors").write_bytes(b"other weights")
    assert h != config_hash(FinetuneConfig(), tmp_path, "t", ("x", "y"), train)


def test_head_round_trip(tmp_path):
    head = Head(torch.randn(3, 5), torch.randn(3), ("a", "b", "c"), 48)
    save_head(tmp_path / "heads" / "t.safetensors", head)
    back = load_head(tmp_path / "heads" / "t.safetensors")
    assert torch.equal(back.weight, head.weight) and torch.equal(back.bias, head.bias)
    assert (back.labels, back.max_length) == (head.labels, head.max_length)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film", "very", "dull", "a", "plot"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=32)
    return BertModel(config).eval(), tokenizer


def test_batched_prediction_equals_one_text_at_a_time(tiny_bert):
    encoder, tokenizer = tiny_bert
    torch.manual_seed(1)
    head = Head(torch.randn(3, 8), torch.randn(3), ("x", "y", "z"), 6)
    texts = ["good film", "very very dull plot a film", "bad", "a good plot", "dull dull dull dull dull dull dull"]
    batched = predict(encoder, tokenizer, head, texts, batch_size=2)
    single = []
    for text in texts:
        enc = tokenizer([text], truncation=True, max_length=6, return_tensors="pt")
        with torch.no_grad():
            pooled = encoder(**enc).last_hidden_state.mean(1)  # no padding: a plain mean
        single.append(int((pooled @ head.weight.T + head.bias).argmax()))
    assert batched == single
    labels = [Example(t, p) for t, p in zip(texts, single)]
    assert finetune.accuracy(encoder, tokenizer, head, labels) == 1.0
    flipped = [Example(e.text, (e.label + 1) % 3) for e in labels]
    assert finetune.accuracy(encoder, tokenizer, head, flipped) == 0.0
