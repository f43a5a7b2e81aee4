"""Builders of small checkpoints for the tests (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


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
