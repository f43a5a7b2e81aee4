"""classify: against a slow manual forward of the tiny Llama (no hooks, explicit loops)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from neuromerge_cli.classify import ExemplarTopK, classify, vote, write_classification
from neuromerge_cli.corpora import load_corpora
from neuromerge_cli.errors import MergeError
from neuromerge_cli.neuron_groups import load_groups
from neuromerge_cli.recipe import parse_recipe
from tiny_llama import build_llama, write_corpora

SIZES = {"general": 9, "math": 7, "code": 8}
TOP_K = 5
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("classify")
    base = build_llama(root / "base", seed=3)
    corpora = write_corpora(root / "corpora", SIZES)
    data = {"base_model": str(base), "models": [str(root / "ft")], "method": "task_arithmetic",
            "classify": {"corpora": {"math": corpora["math"], "general": corpora["general"], "code": corpora["code"]},
                         "top_k": TOP_K, "max_tokens": MAX_TOKENS, "batch_size": 4}}
    return {"root": root, "base": base, "data": data}


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def manual_scores(model_dir: Path, encoded: list[tuple[list[int], list[bool]]]) -> torch.Tensor:
    """a_j(s) = max over scored tokens of |SiLU(gate_j·z)·(up_j·z)|, from the weights: (L, N, I)."""
    sd = load_file(str(model_dir / "model.safetensors"))
    cfg = json.loads((model_dir / "config.json").read_text())
    hidden, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps, theta = hidden // heads, cfg["rms_norm_eps"], cfg["rope_parameters"]["rope_theta"]
    layers, width = cfg["num_hidden_layers"], cfg["intermediate_size"]
    out = torch.zeros(layers, len(encoded), width)
    for s, (ids, keep) in enumerate(encoded):
        n = len(ids)
        h = sd["model.embed_tokens.weight"][ids]
        inv = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
        ang = torch.arange(n).float()[:, None] * inv[None]
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

        def rope(x: torch.Tensor) -> torch.Tensor:
            return x * cos + torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], -1) * sin

        for layer in range(layers):
            p = f"model.layers.{layer}."
            x = _rms(h, sd[p + "input_layernorm.weight"], eps)
            q = rope((x @ sd[p + "self_attn.q_proj.weight"].T).view(n, heads, hd).transpose(0, 1))
            k = rope((x @ sd[p + "self_attn.k_proj.weight"].T).view(n, kv, hd).transpose(0, 1))
            v = (x @ sd[p + "self_attn.v_proj.weight"].T).view(n, kv, hd).transpose(0, 1)
            k, v = k.repeat_interleave(heads // kv, 0), v.repeat_interleave(heads // kv, 0)
            att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
            att = att.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf")).softmax(-1)
            h = h + (att @ v).transpose(0, 1).reshape(n, hidden) @ sd[p + "self_attn.o_proj.weight"].T
            z = _rms(h, sd[p + "post_attention_layernorm.weight"], eps)
            phis = []
            for t in range(n):
                phi = torch.nn.functional.silu(sd[p + "mlp.gate_proj.weight"] @ z[t]) * (sd[p + "mlp.up_proj.weight"] @ z[t])
                phis.append(phi)
                if keep[t]:
                    out[layer, s] = torch.maximum(out[layer, s], phi.abs())
            h = h + torch.stack(phis) @ sd[p + "mlp.down_proj.weight"].T
    return out


def reference_categories(scores: torch.Tensor, category_of: list[int], k: int, num_categories: int) -> torch.Tensor:
    """Top-k by (score desc, index asc), most votes, then higher summed score, then lower code."""
    layers, n, width = scores.shape
    codes = torch.zeros(layers, width, dtype=torch.long)
    for layer in range(layers):
        for j in range(width):
            top = sorted(range(n), key=lambda s: (-float(scores[layer, s, j]), s))[:k]
            votes = [0] * num_categories
            sums = [0.0] * num_categories
            for s in top:
                votes[category_of[s]] += 1
                sums[category_of[s]] += float(scores[layer, s, j])
            codes[layer, j] = min(range(num_categories), key=lambda c: (-votes[c], -sums[c], c))
    return codes


def test_classification_matches_manual_forward(setup: dict) -> None:
    from transformers import AutoTokenizer

    recipe = parse_recipe(setup["data"])
    cfg = recipe.classify
    assert cfg.categories == ["general", "math", "code"]
    result = classify(recipe, cfg, torch.device("cpu"))
    exemplars = load_corpora(cfg.corpora)
    assert [sum(e.category == c for e in exemplars) for c in range(3)] == list(SIZES.values())
    tok = AutoTokenizer.from_pretrained(setup["base"])
    encoded = []
    for ex in exemplars:
        ids = tok(ex.text, truncation=True, max_length=MAX_TOKENS)["input_ids"]
        encoded.append((ids, [i != tok.bos_token_id for i in ids]))
    assert any(len(ids) == MAX_TOKENS for ids, _ in encoded), "some exemplars must be truncated"
    scores = manual_scores(setup["base"], encoded)
    want = reference_categories(scores, [e.category for e in exemplars], TOP_K, 3)
    assert len(set(want.flatten().tolist())) == 3, "the fixture should produce every category"
    got = torch.stack([result.groups.codes[layer] for layer in sorted(result.groups.codes)])
    assert torch.equal(got, want)
    assert result.summary["totals"] == {c: int((want == i).sum()) for i, c in enumerate(cfg.categories)}
    assert result.summary["exemplars"] == SIZES


def test_batch_size_and_padding_do_not_change_groups(setup: dict) -> None:
    recipe = parse_recipe(setup["data"])
    codes = []
    for batch in (1, 7, 64):
        cfg = type(recipe.classify)(**{**recipe.classify.__dict__, "batch_size": batch})
        codes.append(classify(recipe, cfg, torch.device("cpu")).groups.codes)
    for other in codes[1:]:
        assert all(torch.equal(codes[0][layer], other[layer]) for layer in codes[0])


def test_topk_breaks_score_ties_by_exemplar_index() -> None:
    top = ExemplarTopK(1, 2, 3, torch.device("cpu"))
    # exemplars arrive out of order; neuron 0 sees equal scores everywhere
    top.update(torch.tensor([[[1.0, 5.0], [1.0, 2.0]]]), torch.tensor([4, 2]))
    top.update(torch.tensor([[[1.0, 9.0], [1.0, 1.0], [2.0, 3.0]]]), torch.tensor([3, 0, 1]))
    assert top.index[0, 0].tolist() == [1, 0, 2]  # score 2 first, then the ties by index
    assert top.index[0, 1].tolist() == [3, 4, 1]
    assert top.scores[0, 1].tolist() == [9.0, 5.0, 3.0]


def test_vote_tie_rule() -> None:
    category = torch.tensor([0, 0, 1, 1, 2, 2])
    index = torch.tensor([[[0, 2, 4, 1], [2, 0, 3, 1], [4, 2, 0, 5], [0, 2, 4, 5]]])
    scores = torch.tensor([[[9.0, 8.0, 7.0, 1.0], [5.0, 4.0, 3.0, 2.0], [4.0, 3.0, 3.0, 2.0], [3.0, 3.0, 3.0, 3.0]]])
    codes = vote(index, scores, category, 3)
    # 1: general 2 votes (10) vs task 1 with 1 vote; 2: tie 2-2, sums 7 vs 6 -> 1; 3: tie 2 (6) / 2 (7) -> 2 wins
    # 4: votes 1,1,2 -> category 2 wins outright
    assert codes.tolist() == [[0, 1, 2, 2]]
    tied = vote(torch.tensor([[[0, 2]]]), torch.tensor([[[1.0, 1.0]]]), category, 3)
    assert tied.tolist() == [[0]]  # equal votes and sums: the earlier category


def test_write_and_cli_table(setup: dict, tmp_path: Path) -> None:
    data = dict(setup["data"])
    data["classify"] = {**data["classify"], "output": str(tmp_path / "groups.safetensors")}
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(data, sort_keys=False))
    run = subprocess.run([sys.executable, "-m", "neuromerge_cli", "classify", str(recipe_path), "--device", "cpu"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "general" in run.stdout and "math" in run.stdout and "all" in run.stdout
    groups = load_groups(tmp_path / "groups.safetensors")
    assert groups.categories == ["general", "math", "code"]
    summary = json.loads((tmp_path / "groups.json").read_text())
    assert summary["totals"] == groups.totals() and sum(summary["totals"].values()) == 2 * 24
    again = subprocess.run([sys.executable, "-m", "neuromerge_cli", "classify", str(recipe_path)],
                           capture_output=True, text=True)
    assert again.returncode == 1 and "already exists" in again.stderr and "Traceback" not in again.stderr


def test_unsupported_architecture_is_a_clear_error(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=24)).save_pretrained(tmp_path / "bert")
    corpus = tmp_path / "c.txt"
    corpus.write_text("a b\n\nc d\n")
    recipe = parse_recipe({"base_model": str(tmp_path / "bert"), "models": ["x"], "method": "linear",
                           "classify": {"corpora": {"general": str(corpus), "math": str(corpus)}}})
    with pytest.raises(MergeError, match="architecture 'bert' is not supported"):
        classify(recipe, recipe.classify, torch.device("cpu"))


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])
def test_other_llama_style_architectures(tmp_path: Path, model_type: str) -> None:
    """Mistral, Qwen2 and Qwen3 load and pass the φ check on the hooked down_proj input."""
    base = build_llama(tmp_path / model_type, model_type=model_type, layers=1)
    corpora = write_corpora(tmp_path / "corpora", {"general": 3, "code": 3})
    recipe = parse_recipe({"base_model": str(base), "models": ["x"], "method": "linear",
                           "classify": {"corpora": corpora, "top_k": 3}})
    result = classify(recipe, recipe.classify, torch.device("cpu"))
    assert result.groups.codes[0].shape == (24,)
    write_classification(result, tmp_path / "g.safetensors", overwrite=False)
    with pytest.raises(MergeError, match="already exists"):
        write_classification(result, tmp_path / "g.safetensors", overwrite=False)


def test_phi_check_refuses_another_activation() -> None:
    """The hooked down_proj input must equal SiLU(gate·z)·(up·z); a GELU-gated MLP is refused."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from neuromerge_cli.classify import _ActivationScores

    mlp = LlamaMLP(LlamaConfig(hidden_size=8, intermediate_size=12, num_attention_heads=2))
    hooks = _ActivationScores([(0, mlp)])
    hooks.mask = torch.ones(1, 3, dtype=torch.bool)
    z = torch.randn(1, 3, 8)
    with torch.no_grad():
        mlp(z)  # SiLU: passes and records the scores
        want = (torch.nn.functional.silu(mlp.gate_proj(z)) * mlp.up_proj(z)).abs().amax(1)
        torch.testing.assert_close(hooks.scores[0], want)
        hooks.verify = True
        mlp.act_fn = torch.nn.GELU()
        with pytest.raises(MergeError, match="not SiLU"):
            mlp(z)
    hooks.remove()
