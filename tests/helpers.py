"""Builders of small checkpoints for the tests (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from neuromerge_cli import kernels

# A test of where the fused C kernels take over: skipped when they are off (NEUROMERGE_KERNELS=0, the
# torch path that a GPU runs, which `make test` also runs the suite on).
needs_kernels = pytest.mark.skipif(not kernels.ENABLED, reason="the fused kernels are off (NEUROMERGE_KERNELS=0)")


def write_model(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None,
                shards: int = 1) -> Path:
    """A model folder with plain safetensors weights (sharded with an index when shards > 1)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "toy"}))
    names = list(tensors)
    if shards == 1:
        save_file({n: tensors[n].contiguous() for n in names}, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({n: tensors[n].contiguous() for n in part}, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def toy_tensors(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A small state dict with neuron, point and integer tensors."""
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(20, 8, generator=g).to(dtype),
        "layer.0.weight": torch.randn(16, 8, generator=g).to(dtype),
        "layer.0.bias": torch.randn(16, generator=g).to(dtype),
        "layer.1.weight": torch.randn(8, 16, generator=g).to(dtype),
        "conv.weight": torch.randn(4, 2, 3, 3, generator=g).to(dtype),
        "norm.weight": torch.ones(8, dtype=dtype),
        "position_ids": torch.arange(10, dtype=torch.int64),
    }


def fine_tune(base: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A 'fine-tuned' copy: every float tensor moved by a seeded random delta."""
    g = torch.Generator().manual_seed(1000 + seed)
    out = {}
    for name, t in base.items():
        if t.is_floating_point():
            out[name] = (t.float() + scale * torch.randn(t.shape, generator=g)).to(t.dtype)
        else:
            out[name] = t.clone()
    return out


def toy_family(root: Path, num_tasks: int = 3, dtype: torch.dtype = torch.float32, shards: int = 1
               ) -> tuple[Path, list[Path]]:
    """A base and ``num_tasks`` fine-tuned folders of the toy model."""
    base = toy_tensors(0, dtype)
    write_model(root / "base", base, shards=shards)
    tasks = [write_model(root / f"task{t}", fine_tune(base, t), shards=shards) for t in range(num_tasks)]
    return root / "base", tasks


# Statistics reads of a global-trim TIES merge of the toy models: too small to sample, two for the exact thresholds (the
# majority sign comes from the merge read)
GLOBAL_TIES_READS = 2


def write_recipe(path: Path, base: Path, tasks: list[Path], method: str, parameters: dict | None = None,
                 output: Path | None = None, **extra: object) -> Path:
    import yaml

    data: dict = {"base_model": str(base), "models": [{"model": str(t)} for t in tasks], "method": method}
    if parameters:
        data["parameters"] = parameters
    if output is not None:
        data["output"] = str(output)
    data.update(extra)
    path.write_text(yaml.safe_dump(data))
    return path


def merge(recipe: dict | Path, output: Path, shard_size: int | None = None, device: str = "cpu",
          **options: object) -> dict:
    """Parse a recipe (a dict or a file), plan and run it (on the CPU by default); returns the report."""
    from neuromerge_cli.engine import DEFAULT_SHARD_SIZE, MergeOptions, prepare, run_merge
    from neuromerge_cli.recipe import load_recipe, parse_recipe

    r = load_recipe(recipe) if isinstance(recipe, Path) else parse_recipe(recipe)
    size = shard_size or DEFAULT_SHARD_SIZE
    return run_merge(prepare(r, size), MergeOptions(output, device, shard_size=size, **options))  # type: ignore[arg-type]


def recipe_dict(base: Path, tasks: list[Path], method: str, parameters: dict | None = None,
                weights: list[float] | None = None, **extra: object) -> dict:
    models = [{"model": str(t)} if weights is None else {"model": str(t), "weight": w}
              for t, w in zip(tasks, weights or [None] * len(tasks))]
    return {"base_model": str(base), "models": models, "method": method,
            "parameters": dict(parameters or {}), **extra}


def load_output(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a merged folder, read with safetensors' own reader."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(folder / file), framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    return out


def tiny_hf_family(root: Path, kind: str, num_tasks: int = 2, tie: bool = False, scale: float = 0.02,
                   max_shard_size: str | None = None) -> tuple[Path, list[Path]]:
    """A tiny random transformers model (``bert`` or ``llama``) saved with save_pretrained, plus
    ``num_tasks`` perturbed copies (sharded by transformers when ``max_shard_size`` is given)."""
    import transformers

    torch.manual_seed(0)
    if kind == "bert":
        config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=32)
        model = transformers.BertModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                          tie_word_embeddings=tie)
        model = transformers.LlamaForCausalLM(config)
    save = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(root / "base", **save)
    tasks = []
    for t in range(num_tasks):
        g = torch.Generator().manual_seed(100 + t)
        with torch.no_grad():
            copy = type(model)(config)
            copy.load_state_dict(model.state_dict())
            for p in copy.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g))
        copy.save_pretrained(root / f"task{t}", **save)
        tasks.append(root / f"task{t}")
    return root / "base", tasks


def hub_cache(cache: Path, repo_id: str, source: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Lay ``source``'s files out exactly as huggingface_hub caches them; returns the snapshot folder.

    ``models--org--name/blobs/<hash>`` holds the bytes, ``refs/<branch>`` the commit, and
    ``snapshots/<commit>/<file>`` is a relative symlink to the blob.
    """
    import hashlib
    import os

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(source.iterdir()):
        data = file.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        link = snapshot / file.name
        if not link.exists():
            os.symlink(os.path.join("..", "..", "blobs", blob), link)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def dyadic_family(root: Path, weights: tuple[float, ...] = (1.0, 1.0, 1.0), seed: int = 0, shards: int = 1
                  ) -> tuple[Path, list[Path]]:
    """A toy base and tasks whose values are multiples of 1/8, so float32 sums are exact.

    A third of the coordinates cancel exactly in the weighted sum of the first two tasks (the
    third task is 0 there): TIES falls back to the majority sign on them. ``layer.1.weight``
    leans negative while the model as a whole leans positive, so the per-tensor and the global
    majority signs differ.
    """
    g = torch.Generator().manual_seed(seed)
    base = toy_tensors(seed)
    base = {n: (torch.round(t * 8) / 8 if t.is_floating_point() else t) for n, t in base.items()}
    write_model(root / "base", base, shards=shards)
    deltas: list[dict[str, torch.Tensor]] = [{} for _ in weights]
    for name, t in base.items():
        if not t.is_floating_point():
            continue
        lo, hi = (-4, 3) if name == "layer.1.weight" else (-2, 5)
        for d in deltas:
            d[name] = torch.randint(lo, hi, t.shape, generator=g).float() / 8
        cancel = torch.rand(t.shape, generator=g) < 0.33
        deltas[1][name] = torch.where(cancel, -deltas[0][name] * weights[0] / weights[1], deltas[1][name])
        for d in deltas[2:]:
            d[name] = torch.where(cancel, 0.0, d[name])
    tasks = []
    for i, d in enumerate(deltas):
        tensors = {n: (t + d[n] if n in d else t.clone()) for n, t in base.items()}
        tasks.append(write_model(root / f"task{i}", tensors, shards=shards))
    return root / "base", tasks


def run_engine_merge(root: Path, base: Path, tasks: list[Path], method: str, parameters: dict | None = None,
                     weights: list[float] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Merge through the engine (CPU) and return (the output's tensors, merge_report.json)."""
    from safetensors.torch import load_file

    from neuromerge_cli.engine import MergeOptions, prepare, run_merge
    from neuromerge_cli.recipe import load_recipe

    root.mkdir(parents=True, exist_ok=True)
    extra = {} if weights is None else {"models": [{"model": str(t), "weight": w} for t, w in zip(tasks, weights)]}
    recipe_path = write_recipe(root / f"{method}.yaml", base, tasks, method, parameters, **extra)
    out = root / f"out_{method}"
    report = run_merge(prepare(load_recipe(recipe_path)), MergeOptions(output=out, device="cpu", overwrite=True))
    return load_file(str(out / "model.safetensors")), report
