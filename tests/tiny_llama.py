"""A tiny random Llama with a word-level tokenizer, built offline, and exemplar corpora for it."""

from __future__ import annotations

import random
from pathlib import Path

import torch

WORDS = ("the a cat dog runs sits on mat two plus three equals five four def return if else for in "
         "print x y z import sum add carry apple red green blue sky sun moon").split()
SPECIALS = ["[UNK]", "[PAD]", "[BOS]"]


def build_tokenizer(folder: Path) -> None:
    """A word-level tokenizer that prepends [BOS] (a special token, not scored by classify)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]")
    fast.save_pretrained(folder)


def build_llama(folder: Path, seed: int = 0, layers: int = 2, intermediate: int = 24, model_type: str = "llama",
                mlp_bias: bool = False) -> Path:
    """A random Llama-family model (Llama, Mistral, Qwen2 or Qwen3 config) saved with its tokenizer."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    config_cls, model_cls = classes[model_type]
    kwargs = dict(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=16, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  pad_token_id=1, bos_token_id=2, eos_token_id=2, tie_word_embeddings=False)
    if model_type == "llama":
        kwargs["mlp_bias"] = mlp_bias
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():  # larger weights than the default init: activations that differ clearly
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    build_tokenizer(folder)
    return folder


def write_corpora(folder: Path, sizes: dict[str, int], seed: int = 0) -> dict[str, str]:
    """Random exemplar texts per category (plain text, blank-line separated), some long."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for cat, n in sizes.items():
        pool = WORDS[: len(WORDS) // 2] if cat == "general" else WORDS[len(WORDS) // 3:]
        texts = [" ".join(rng.choice(pool) for _ in range(rng.randint(1, 14))) for _ in range(n)]
        path = folder / f"{cat}.txt"
        path.write_text("\n\n".join(texts) + "\n")
        paths[cat] = str(path)
    return paths
