"""Functional neuron groups of gated MLPs: the groups file and the Llama-style MLP layout.

A groups file (written by `neuromerge classify`, read by the `neuronmerge` method) is a
safetensors file with one int16 tensor ``layers.N`` per MLP layer N: the category code of every
intermediate neuron (0 = ``general``, then the task categories in recipe order). Its metadata
names the categories (``categories``, a JSON list) and how the classification was made.

MLP neuron j of layer N is row j of ``gate_proj`` and ``up_proj`` (weight and bias) and column j
of ``down_proj.weight`` (``down_proj.bias`` is per output channel, not per neuron).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import MergeError

GENERAL = "general"
FORMAT = "neuromerge-groups"
FORMAT_VERSION = "1"
SUPPORTED_ARCHITECTURES = "Llama, Mistral, Qwen2, Qwen3, SmolLM"
# model.layers.N.mlp.{gate,up,down}_proj.{weight,bias} (also without the `model.` prefix)
MLP_TENSOR = re.compile(r"^(?:model\.)?layers\.(\d+)\.mlp\.(gate|up|down)_proj\.(weight|bias)$")


@dataclass(frozen=True)
class MlpSlot:
    """Where a tensor's neurons lie: MLP layer, projection and the tensor axis indexed by neuron."""

    layer: int
    proj: str  # gate | up | down
    axis: int  # 0: rows (gate/up weight and bias), 1: columns (down weight)


def mlp_slot(name: str) -> MlpSlot | None:
    """The neuron layout of a per-neuron MLP tensor, or None (down_proj.bias included)."""
    m = MLP_TENSOR.match(name)
    if m is None:
        return None
    layer, proj, kind = int(m.group(1)), m.group(2), m.group(3)
    if proj == "down":
        return MlpSlot(layer, proj, 1) if kind == "weight" else None
    return MlpSlot(layer, proj, 0)


@dataclass
class NeuronGroups:
    """Category codes per MLP layer and the category names (index = code; 0 is general)."""

    categories: list[str]
    codes: dict[int, torch.Tensor]  # layer -> (intermediate,) int64
    metadata: dict[str, str] = field(default_factory=dict)

    def counts(self, layer: int) -> dict[str, int]:
        counts = torch.bincount(self.codes[layer], minlength=len(self.categories)).tolist()
        return dict(zip(self.categories, counts))

    def totals(self) -> dict[str, int]:
        total = {c: 0 for c in self.categories}
        for layer in self.codes:
            for c, n in self.counts(layer).items():
                total[c] += n
        return total

    def shuffled(self, seed: int) -> "NeuronGroups":
        """The paper's control: the same group sizes per layer, neurons assigned at random (seeded)."""
        from .methods.common import tensor_seed  # here: the methods package imports this module

        codes = {}
        for layer, c in self.codes.items():
            gen = torch.Generator().manual_seed(tensor_seed(seed, f"layers.{layer}", -1))
            codes[layer] = c[torch.randperm(c.numel(), generator=gen)]
        return NeuronGroups(list(self.categories), codes, {**self.metadata, "random_groups_seed": str(seed)})


def save_groups(groups: NeuronGroups, path: Path) -> None:
    """Write the groups file atomically (a temporary file renamed into place)."""
    tensors = {f"layers.{layer}": codes.to(torch.int16).contiguous() for layer, codes in sorted(groups.codes.items())}
    meta = {**groups.metadata, "format": FORMAT, "format_version": FORMAT_VERSION,
            "categories": json.dumps(groups.categories)}
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_groups(path: str | Path) -> NeuronGroups:
    """Read and check a groups file; every problem is a MergeError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise MergeError(f"{p}: no such groups file (write it with `neuromerge classify`)")
    try:
        tensors = load_file(str(p))
        with safe_open(str(p), "pt") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise MergeError(f"{p}: not a readable safetensors groups file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise MergeError(f"{p}: not a neuromerge groups file (metadata format is {meta.get('format')!r}, expected {FORMAT!r})")
    try:
        categories = json.loads(meta["categories"])
    except (KeyError, ValueError):
        raise MergeError(f"{p}: metadata 'categories' is missing or not JSON") from None
    if (not isinstance(categories, list) or not categories or categories[0] != GENERAL
            or not all(isinstance(c, str) for c in categories) or len(set(categories)) != len(categories)):
        raise MergeError(f"{p}: metadata 'categories' must be a list of distinct names starting with '{GENERAL}', got {categories!r}")
    codes: dict[int, torch.Tensor] = {}
    for name, t in tensors.items():
        m = re.fullmatch(r"layers\.(\d+)", name)
        if m is None or t.ndim != 1 or t.dtype.is_floating_point:
            raise MergeError(f"{p}: unexpected tensor '{name}' (expected 1-D integer tensors 'layers.N')")
        c = t.long()
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= len(categories)):
            raise MergeError(f"{p}: tensor '{name}' has codes outside 0..{len(categories) - 1}")
        codes[int(m.group(1))] = c
    if not codes:
        raise MergeError(f"{p}: holds no layers")
    return NeuronGroups(categories, codes, meta)
