"""Real transformers checkpoints in and out: the merged folder loads with from_pretrained unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from typer.testing import CliRunner

from helpers import merge, recipe_dict, tiny_hf_family, write_recipe
from neuromerge_cli.cli import app
from reference import reference_merge

transformers = pytest.importorskip("transformers")


def load(folder: Path, auto: type) -> tuple[torch.nn.Module, dict]:
    model, info = auto.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model, info


def test_bert_dare_ties(tmp_path: Path) -> None:
    base, tasks = tiny_hf_family(tmp_path, "bert", num_tasks=3)
    params = {"density": 0.5, "seed": 5}
    recipe = write_recipe(tmp_path / "r.yaml", base, tasks, "dare_ties", params)
    result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(tmp_path / "out"), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    model, _ = load(tmp_path / "out", transformers.AutoModel)
    assert type(model).__name__ == "BertModel"
    ref = reference_merge(base, tasks, "dare_ties", params)
    state = model.state_dict()
    assert set(ref) <= set(state)
    for name, expected in ref.items():
        torch.testing.assert_close(state[name].double(), expected.double(), rtol=0, atol=2e-6, msg=name)


@pytest.mark.parametrize("tie", [True, False])
def test_llama_ties_tied_and_untied_embeddings(tmp_path: Path, tie: bool) -> None:
    base, tasks = tiny_hf_family(tmp_path, "llama", num_tasks=2, tie=tie, max_shard_size=None if tie else "20KB")
    assert (base / "model.safetensors.index.json").exists() is not tie
    params = {"density": 0.3}
    dtype = "bfloat16" if not tie else None
    merge(recipe_dict(base, tasks, "ties", params, **({"dtype": dtype} if dtype else {})), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    # transformers >= 4.56 writes "dtype", older versions "torch_dtype"
    assert config["tie_word_embeddings"] is tie and config.get("dtype", config.get("torch_dtype")) == (dtype or "float32")
    assert (tmp_path / "out" / "generation_config.json").read_bytes() == (base / "generation_config.json").read_bytes()
    index = tmp_path / "out" / "model.safetensors.index.json"
    if not tie:  # laid out like the sharded base
        base_map = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
        assert json.loads(index.read_text())["weight_map"] == base_map
    assert index.exists() is not tie
    model, _ = load(tmp_path / "out", transformers.AutoModelForCausalLM)
    state = model.state_dict()
    ref = reference_merge(base, tasks, "ties", params)
    for name, expected in ref.items():
        if dtype:
            assert state[name].dtype == torch.bfloat16
            torch.testing.assert_close(state[name], expected.float().to(torch.bfloat16), rtol=2**-7, atol=1e-6, msg=name)
        else:
            torch.testing.assert_close(state[name].double(), expected.double(), rtol=0, atol=1e-6, msg=name)
    tied = torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    assert tied is tie
    assert ("lm_head.weight" in ref) is not tie  # the tied base stores the embedding once; so does the output
