"""`neuromerge classify`: group the base model's MLP neurons by function (NeuronMerge, step 1).

For every gated-MLP neuron j, φ_j(z) = SiLU(gate_j·z)·(up_j·z) is read at the input of
``down_proj`` (a forward pre-hook: that input is exactly act(gate(z))·up(z), checked on the first
batch). An exemplar's score is max over its tokens of |φ_j| (padding and the special tokens the
tokenizer adds are ignored); each neuron keeps its top-k exemplars over the whole corpus
(streamed across batches; equal scores: the earlier exemplar wins) and takes the category most
frequent among them. Vote ties: the category with the higher summed score of its exemplars among
the top-k, then the earlier category (`general` first, then the corpora's order).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .checkpoints import resolve
from .corpora import Exemplar, load_corpora
from .errors import MergeError
from .memory import peak_rss_bytes
from .neuron_groups import SUPPORTED_ARCHITECTURES, NeuronGroups, save_groups
from .recipe import DTYPES, ClassifyConfig, Recipe

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SILU_NAMES = ("silu", "swish")
MLP_MODULE = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp$")
TIE_RULE = "most votes among the top-k; then higher summed score; then earlier category"

Progress = Callable[[str, int, int], None]


@dataclass
class Classification:
    """The groups and the figures of one classification run."""

    groups: NeuronGroups
    summary: dict[str, Any]


def check_architecture(config: Any, reference: str) -> None:
    """Only Llama-style gated MLPs with SiLU: φ = SiLU(gate·z)·(up·z) is what the paper defines."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise MergeError(f"{reference}: architecture '{model_type}' is not supported by classify "
                         f"(supported: {SUPPORTED_ARCHITECTURES})")
    act = getattr(config, "hidden_act", None)
    if act not in SILU_NAMES:
        raise MergeError(f"{reference}: hidden_act '{act}' is not SiLU; classify defines φ = SiLU(gate·z)·(up·z)")


def find_mlps(model: torch.nn.Module, reference: str) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, MLP module) for every gated MLP, by layer."""
    mlps = []
    for name, module in model.named_modules():
        m = MLP_MODULE.search(name)
        if m and all(isinstance(getattr(module, p, None), torch.nn.Linear) for p in ("gate_proj", "up_proj", "down_proj")):
            mlps.append((int(m.group(1)), module))
    if not mlps:
        raise MergeError(f"{reference}: no gated MLPs (layers.N.mlp.gate_proj/up_proj/down_proj) found "
                         f"(supported: {SUPPORTED_ARCHITECTURES})")
    return sorted(mlps, key=lambda x: x[0])


class ExemplarTopK:
    """Each neuron's k best exemplars by score, over batches, in bounded memory (L, I, k).

    Order: higher score first; equal scores: lower exemplar index first (whatever the batch order).
    """

    def __init__(self, num_layers: int, width: int, k: int, device: torch.device) -> None:
        self.k = k
        self.scores = torch.empty(num_layers, width, 0, device=device)
        self.index = torch.empty(num_layers, width, 0, dtype=torch.long, device=device)

    def update(self, scores: torch.Tensor, index: torch.Tensor) -> None:
        """``scores`` (L, B, I) of the exemplars ``index`` (B,)."""
        L, B, I = scores.shape
        cand_s = torch.cat([self.scores, scores.permute(0, 2, 1)], dim=-1)
        cand_i = torch.cat([self.index, index.to(self.index.device).expand(L, I, B)], dim=-1)
        by_index = cand_i.argsort(dim=-1, stable=True)
        cand_s, cand_i = cand_s.gather(-1, by_index), cand_i.gather(-1, by_index)
        order = cand_s.argsort(dim=-1, descending=True, stable=True)[..., : self.k]
        self.scores, self.index = cand_s.gather(-1, order), cand_i.gather(-1, order)


def vote(top_index: torch.Tensor, top_scores: torch.Tensor, exemplar_category: torch.Tensor,
         num_categories: int) -> torch.Tensor:
    """Category code per neuron (L, I) from its top-k exemplars (L, I, k), with TIE_RULE."""
    cats = exemplar_category.to(top_index.device)[top_index]
    votes = F.one_hot(cats, num_categories).sum(dim=-2)
    sums = torch.zeros(*cats.shape[:-1], num_categories, dtype=torch.float64, device=cats.device)
    sums.scatter_add_(-1, cats, top_scores.double())
    tied = votes == votes.max(dim=-1, keepdim=True).values
    # argmax returns the first maximum: the earlier category wins remaining ties.
    return torch.where(tied, sums, torch.tensor(-1.0, dtype=torch.float64, device=sums.device)).argmax(dim=-1)


def _tokenize(tokenizer: Any, exemplars: list[Exemplar], max_tokens: int) -> list[tuple[list[int], list[bool]]]:
    """(token ids, scored?) per exemplar: special tokens added by the tokenizer are not scored."""
    out = []
    for ex in exemplars:
        enc = tokenizer(ex.text, truncation=True, max_length=max_tokens, return_special_tokens_mask=True)
        out.append((list(enc["input_ids"]), [not s for s in enc["special_tokens_mask"]]))
    return out


class _ActivationScores:
    """Forward pre-hooks on every down_proj: per exemplar max over scored tokens of |φ|."""

    def __init__(self, mlps: list[tuple[int, torch.nn.Module]]) -> None:
        self.mask: torch.Tensor | None = None  # (B, S) tokens that count
        self.scores: list[torch.Tensor | None] = [None] * len(mlps)
        self.verify = True
        self._z: torch.Tensor | None = None
        self.handles = []
        first = mlps[0][1]
        self.handles.append(first.register_forward_pre_hook(self._keep_input))
        for pos, (_, mlp) in enumerate(mlps):
            self.handles.append(mlp.down_proj.register_forward_pre_hook(self._hook(pos, mlp)))

    def _keep_input(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if self.verify:
            self._z = args[0].detach()

    def _hook(self, pos: int, mlp: torch.nn.Module) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            phi = args[0]
            if pos == 0 and self.verify:
                self._check(mlp, phi)
            assert self.mask is not None
            mags = phi.float().abs().masked_fill(~self.mask.unsqueeze(-1), 0.0)
            self.scores[pos] = mags.amax(dim=1)

        return hook

    def _check(self, mlp: torch.nn.Module, phi: torch.Tensor) -> None:
        """The hooked tensor must be SiLU(gate·z)·(up·z) for this architecture."""
        z = self._z
        assert z is not None
        want = F.silu(mlp.gate_proj(z).float()) * mlp.up_proj(z).float()
        tol = 1e-4 if phi.dtype == torch.float32 else 2e-2
        if not torch.allclose(phi.float(), want, rtol=tol, atol=tol * float(want.abs().max().clamp_min(1.0))):
            raise MergeError("classify: the input of mlp.down_proj is not SiLU(gate_proj(z))·up_proj(z) for this "
                             f"model; its MLP is not Llama-style (supported: {SUPPORTED_ARCHITECTURES})")
        self.verify = False
        self._z = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _load(path: Path, reference: str, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    try:
        from transformers import AutoConfig, AutoModel, AutoTokenizer
    except ImportError:
        raise MergeError("classify runs the base model with transformers: pip install 'neuromerge[hf]'") from None

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise MergeError(f"{reference}: cannot read config.json ({str(exc).splitlines()[0]})") from None
    check_architecture(config, reference)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        raise MergeError(f"{reference}: cannot load the tokenizer ({str(exc).splitlines()[0]})") from None
    try:
        model = AutoModel.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise MergeError(f"{reference}: cannot load the model ({str(exc).splitlines()[0]})") from None
    return tokenizer, model.to(device).eval()


def classify(recipe: Recipe, config: ClassifyConfig, device: torch.device,
             progress: Progress | None = None) -> Classification:
    """Classify every MLP neuron of the recipe's base model over the configured corpora."""
    t0 = time.perf_counter()
    exemplars = load_corpora(config.corpora, config.max_exemplars)
    source = resolve(recipe.base_model)
    tokenizer, model = _load(source.path, recipe.base_model, DTYPES[config.dtype], device)
    mlps = find_mlps(model, recipe.base_model)
    widths = {mlp.down_proj.in_features for _, mlp in mlps}
    if len(widths) != 1:
        raise MergeError(f"{recipe.base_model}: MLP layers of different widths are not supported")
    encoded = _tokenize(tokenizer, exemplars, config.max_tokens)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t1 = time.perf_counter()
    top = ExemplarTopK(len(mlps), widths.pop(), config.top_k, device)
    hooks = _ActivationScores(mlps)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Longest first: similar lengths share a batch (little padding) and memory peaks at once.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    try:
        with torch.inference_mode():
            for start in range(0, len(order), config.batch_size):
                batch = order[start:start + config.batch_size]
                width = max(1, max(len(encoded[i][0]) for i in batch))
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                attention = torch.zeros(len(batch), width, dtype=torch.long)
                scored = torch.zeros(len(batch), width, dtype=torch.bool)
                for row, i in enumerate(batch):
                    tokens, keep = encoded[i]
                    ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                    attention[row, : len(tokens)] = 1
                    scored[row, : len(tokens)] = torch.tensor(keep, dtype=torch.bool)
                hooks.mask = scored.to(device)
                model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False)
                top.update(torch.stack(hooks.scores), torch.tensor(batch))  # type: ignore[arg-type]
                if progress:
                    progress("classify", min(start + config.batch_size, len(order)), len(order))
    finally:
        hooks.remove()
    t2 = time.perf_counter()
    categories = config.categories
    exemplar_category = torch.tensor([ex.category for ex in exemplars])
    codes = vote(top.index, top.scores, exemplar_category, len(categories)).cpu()
    counts = {c: sum(1 for ex in exemplars if ex.category == i) for i, c in enumerate(categories)}
    layers = [layer for layer, _ in mlps]
    metadata = {
        "base_model": recipe.base_model, "model_type": str(getattr(model.config, "model_type", "")),
        "top_k": str(config.top_k), "max_tokens": str(config.max_tokens), "dtype": config.dtype,
        "exemplars": json.dumps(counts), "tie_rule": TIE_RULE,
    }
    groups = NeuronGroups(categories, {layer: codes[pos] for pos, layer in enumerate(layers)}, metadata)
    peak = {"rss_bytes": peak_rss_bytes()}
    if device.type == "cuda":
        peak["cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    summary = {
        "base_model": recipe.base_model, "device": str(device), "dtype": config.dtype,
        "categories": categories, "exemplars": counts, "tokens": sum(len(e[0]) for e in encoded),
        "top_k": config.top_k, "effective_top_k": min(config.top_k, len(exemplars)),
        "max_tokens": config.max_tokens, "tie_rule": TIE_RULE,
        "layers": [{"layer": layer, "counts": groups.counts(layer)} for layer in layers],
        "totals": groups.totals(),
        "timings": {"load_s": t1 - t0, "forward_s": t2 - t1},
        "peak_memory": peak,
    }
    return Classification(groups, summary)


def summary_path(groups_path: Path) -> Path:
    """The JSON summary written beside a groups file."""
    return groups_path.with_suffix(".json")


def write_classification(result: Classification, output: Path, overwrite: bool) -> Path:
    """Write the groups file and its JSON summary; refuses to replace files without ``overwrite``."""
    check_output(output, overwrite)
    summary = summary_path(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        save_groups(result.groups, output)
        summary.write_text(json.dumps(result.summary, indent=2) + "\n")
    except OSError as exc:
        raise MergeError(f"classify.output: cannot write {output} ({exc.strerror or exc})") from None
    return summary


def check_output(output: Path, overwrite: bool) -> None:
    """A `.safetensors` path whose file and summary do not exist yet (unless ``overwrite``)."""
    if output.suffix != ".safetensors":
        raise MergeError(f"classify.output: {output}: expected a file name ending in .safetensors")
    for p in (output, summary_path(output)):
        if p.exists() and not overwrite:
            raise MergeError(f"classify.output: {p} already exists (use --overwrite to replace it)")
