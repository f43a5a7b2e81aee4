"""The engine's GPU path on an emulated CUDA device (tests/emulated_cuda.py): every method places its tensors
where CUDA would let it and writes the bytes of the CPU's torch path, with its device memory bounded."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from emulated_cuda import DeviceTensor, emulated_cuda
from helpers import fine_tune, merge, recipe_dict, tiny_hf_family, toy_family, write_model, write_recipe
from safetensors.torch import load_file
from tiny_llama import build_llama, write_corpora
from typer.testing import CliRunner

from neuromerge_cli import chunking, engine, kernels
from neuromerge_cli.classify import classify
from neuromerge_cli.cli import app
from neuromerge_cli.dryrun import memory_estimate
from neuromerge_cli.engine import prepare
from neuromerge_cli.neuron_groups import NeuronGroups, save_groups
from neuromerge_cli.recipe import parse_recipe


@pytest.fixture
def device(monkeypatch: pytest.MonkeyPatch):
    with emulated_cuda(monkeypatch) as ledger:
        yield ledger


def test_the_emulated_device_keeps_cudas_rules(device) -> None:
    x = torch.ones(4, 3, device="cuda")
    assert isinstance(x, DeviceTensor) and x.device == torch.device("cuda", 0) and x.is_cuda
    assert device.live == device.peak == 48
    y = (x * 2).sum(0)
    assert y.is_cuda and y.tolist() == [8.0, 8.0, 8.0] and float(y[0]) == 8.0
    with pytest.raises(RuntimeError, match="same device"):
        x + torch.ones(3)
    assert (x + torch.tensor(1.0)).is_cuda  # a 0-dim CPU tensor is a scalar, as on CUDA
    with pytest.raises(TypeError, match="numpy"):
        x.numpy()
    host = x.cpu()
    host += 1  # a copy: the device's data unchanged
    assert not host.is_cuda and float(x.sum()) == 12.0
    x[1] = torch.zeros(3, device="cuda")
    assert x[torch.tensor([1])].sum().item() == 0.0  # CPU indices may index a device tensor
    x[0] = torch.zeros(3)  # an assignment to a row is a copy
    with pytest.raises(RuntimeError, match="same device"):
        x[torch.tensor([2])] = torch.zeros(1, 3)  # but values put at CPU indices must be on the device
    with pytest.raises(RuntimeError, match="same device"):
        torch.zeros(4)[x[:, 0] > 0]  # nor device indices a CPU tensor
    target = torch.empty(4, 3)
    target.copy_(x, non_blocking=True)
    assert target.sum().item() == 6.0
    failures: list[BaseException] = []

    def elsewhere() -> None:
        try:
            x.sum()
        except RuntimeError as exc:
            failures.append(exc)

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert len(failures) == 1 and "outside emulated_cuda" in str(failures[0])  # another thread has no device


def toy_models(root: Path, num_tasks: int = 3) -> tuple[Path, list[Path]]:
    return toy_family(root, num_tasks, torch.bfloat16)


def random_models(root: Path, shapes: dict[str, tuple[int, ...]], seed: int, scale: float = 0.05
                  ) -> tuple[Path, list[Path]]:
    """A base of random bfloat16 tensors of ``shapes`` and three fine-tuned copies (``scale`` of noise)."""
    g = torch.Generator().manual_seed(seed)
    base = {name: torch.randn(shape, generator=g).bfloat16() for name, shape in shapes.items()}
    write_model(root / "base", base)
    return root / "base", [write_model(root / f"task{t}", fine_tune(base, t, scale)) for t in range(3)]


def sampled_models(root: Path) -> tuple[Path, list[Path]]:
    """Matrices with enough rows for a sample of rows to aim the global statistics, a vector and a scalar."""
    return random_models(root, {"w": (300, 80), "v": (64, 8), "b": (80,), "s": ()}, seed=3)


CASES = [
    ("linear", {}), ("task_arithmetic", {"lambda": 0.7}), ("ties", {"density": 0.3}),
    ("ties", {"density": 0.3, "mask_scope": "tensor"}), ("dare_ties", {"density": 0.5, "seed": 2}),
    ("dare_linear", {"density": 0.4}), ("neuromerging", {}), ("neuromerging", {"mask_scope": "tensor"}),
    ("pcb", {"ratio": 0.2}), ("tsv", {}), ("iso_c", {}), ("iso_cts", {}),
]


def cpu_and_cuda(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, recipe: dict) -> tuple[dict, dict]:
    """The merge on the CPU's torch path, then on the emulated device in the CPU's chunks: (CPU report, device
    report); the outputs' bytes compared."""
    monkeypatch.setattr(kernels, "ENABLED", False)  # the CPU path whose operations a GPU runs
    monkeypatch.setattr(chunking, "GPU_CHUNK", 0)  # the same chunks and blocks of rows: the same sums
    cpu = merge(recipe, tmp_path / "cpu")
    with emulated_cuda(monkeypatch):
        gpu = merge(recipe, tmp_path / "cuda", device="cuda")
    files = sorted(p.name for p in (tmp_path / "cpu").glob("*.safetensors"))
    assert files == sorted(p.name for p in (tmp_path / "cuda").glob("*.safetensors"))
    for name in files:
        assert (tmp_path / "cuda" / name).read_bytes() == (tmp_path / "cpu" / name).read_bytes(), name
    assert gpu["device"] == "cuda:0" and cpu["device"] == "cpu"
    assert gpu.get("global") == cpu.get("global")
    return cpu, gpu


@pytest.mark.parametrize("method, params", CASES)
def test_every_method_runs_on_the_device_and_writes_the_cpu_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  method: str, params: dict) -> None:
    base, tasks = toy_models(tmp_path / "m")
    _, gpu = cpu_and_cuda(monkeypatch, tmp_path, recipe_dict(base, tasks, method, params))
    assert gpu["peak_memory"]["cuda_bytes"] > 0


@pytest.mark.parametrize("method, params", [
    ("ties", {"density": 0.3}), ("neuromerging", {}), ("pcb", {"ratio": 0.2}), ("dare_ties", {"density": 0.5}),
    ("ties", {"density": 0.3, "mask_scope": "tensor"}),
])
def test_sampled_statistics_and_row_blocks_on_the_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         method: str, params: dict) -> None:
    base, tasks = sampled_models(tmp_path / "m")
    monkeypatch.setattr(engine, "SAMPLE_SHARE", 1.0)  # every row sampled: the windows hold, fewer reads
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 1000)  # row blocks of 12 rows of w
    recipe = recipe_dict(base, tasks, method, params)
    cpu, gpu = cpu_and_cuda(monkeypatch, tmp_path, recipe)
    assert gpu["timings"]["statistics_reads"] == cpu["timings"]["statistics_reads"]


def test_neuronmerge_runs_on_the_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base_dir = build_llama(tmp_path / "base", seed=1, layers=2, intermediate=24, mlp_bias=True)
    base = load_file(str(base_dir / "model.safetensors"))
    config = json.loads((base_dir / "config.json").read_text())
    dirs = [write_model(tmp_path / f"ft{t}", fine_tune(base, t), config) for t in range(2)]
    gen = torch.Generator().manual_seed(7)
    codes = {layer: torch.randint(0, 3, (24,), generator=gen) for layer in range(2)}
    save_groups(NeuronGroups(["general", "math", "code"], codes), tmp_path / "groups.safetensors")
    params = {"groups": str(tmp_path / "groups.safetensors"), "general_method": "ties",
              "general_params": {"density": 0.3}, "other_method": "neuromerging"}
    cpu_and_cuda(monkeypatch, tmp_path, recipe_dict(base_dir, dirs, "neuronmerge", params))


def layered_models(root: Path, layers: int) -> tuple[Path, list[Path]]:
    """``layers`` matrices of one shape and a vector: a model that grows without its largest tensor growing."""
    return random_models(root, {**{f"w{i}": (300, 80) for i in range(layers)}, "b": (80,)}, seed=3)


@pytest.mark.parametrize("method, params", [("task_arithmetic", {}), ("ties", {"density": 0.3}),
                                            ("ties", {"density": 0.3, "mask_scope": "tensor"}),
                                            ("neuromerging", {}), ("pcb", {"ratio": 0.2})])
def test_device_memory_does_not_grow_with_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str,
                                                    params: dict) -> None:
    """Bounded GPU memory: the device holds the pieces in work and the statistics' tables, not the model."""
    monkeypatch.setattr(engine, "SAMPLE_SHARE", 0.0)  # the same reads at both sizes
    peaks = []
    for layers in (4, 16):
        base, tasks = layered_models(tmp_path / str(layers), layers)
        _, gpu = cpu_and_cuda(monkeypatch, tmp_path / f"out{layers}", recipe_dict(base, tasks, method, params))
        peaks.append(gpu["peak_memory"]["cuda_bytes"])
    piece = 300 * 80 * 4 * 4  # one matrix's base and task vectors in float32
    assert 0 < peaks[0] and peaks[1] == peaks[0]
    assert peaks[0] < 4 * piece + 16 * 3 * (1 << 16) * 8  # beside the pieces, a few tables of 2^16 counts a task


def test_the_command_picks_the_device_when_there_is_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``neuromerge run`` (--device auto) merges on the GPU where torch sees one, and says so."""
    base, tasks = toy_models(tmp_path / "m")
    recipe = write_recipe(tmp_path / "r.yaml", base, tasks, "ties", {"density": 0.3})
    with emulated_cuda(monkeypatch):
        result = CliRunner().invoke(app, ["run", str(recipe), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "on cuda:0" in result.output
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["device"] == "cuda:0" and report["peak_memory"]["cuda_bytes"] > 0


def test_classify_runs_on_the_device_and_finds_the_cpu_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NeuronMerge's classification: the model's forward passes, the hooks' scores and the vote on the device."""
    base = build_llama(tmp_path / "base", seed=3)
    corpora = write_corpora(tmp_path / "corpora", {"general": 9, "math": 7, "code": 8})
    recipe = parse_recipe({"base_model": str(base), "models": [str(tmp_path / "ft")], "method": "task_arithmetic",
                           "classify": {"corpora": corpora, "top_k": 5, "max_tokens": 10, "batch_size": 4}})
    cpu = classify(recipe, recipe.classify, torch.device("cpu"))
    with emulated_cuda(monkeypatch):
        gpu = classify(recipe, recipe.classify, torch.device("cuda", 0))
    assert gpu.summary["device"] == "cuda:0" and gpu.summary["peak_memory"]["cuda_bytes"] > 0
    assert sorted(gpu.groups.codes) == sorted(cpu.groups.codes)
    for layer, codes in cpu.groups.codes.items():
        assert not gpu.groups.codes[layer].is_cuda and torch.equal(gpu.groups.codes[layer], codes)


@pytest.mark.parametrize("method, params", [("task_arithmetic", {}), ("ties", {"density": 0.2}),
                                            ("neuromerging", {}), ("pcb", {"ratio": 0.1})])
def test_on_the_device_a_merge_works_in_large_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str,
                                                     params: dict) -> None:
    """On a GPU each call is a kernel launch: blocks and chunks of GPU_CHUNK entries take several times fewer
    calls than the CPU's cache-sized ones, for the same merge (to float rounding of sums)."""
    base, tasks = random_models(tmp_path, {"w0": (2048, 2048), "w1": (2048, 2048)}, seed=4, scale=0.01)  # 4 CPU blocks
    recipe = recipe_dict(base, tasks, method, params)
    monkeypatch.setattr(kernels, "ENABLED", False)
    calls, outputs = [], []
    for gpu_chunk in (0, chunking.GPU_CHUNK):  # the CPU's chunks, then the device's
        monkeypatch.setattr(chunking, "GPU_CHUNK", gpu_chunk)
        with emulated_cuda(monkeypatch) as ledger:
            merge(recipe, tmp_path / f"out{gpu_chunk}", device="cuda")
        calls.append(ledger.calls)
        outputs.append(load_file(str(tmp_path / f"out{gpu_chunk}" / "model.safetensors")))
    assert calls[1] * 3 < calls[0], calls
    for name, tensor in outputs[0].items():
        torch.testing.assert_close(outputs[1][name].float(), tensor.float(), rtol=0, atol=0)


@pytest.mark.parametrize("method, params", [("task_arithmetic", {}), ("ties", {"density": 0.2}),
                                            ("ties", {"density": 0.2, "mask_scope": "tensor"}), ("neuromerging", {}),
                                            ("pcb", {"ratio": 0.1})])
def test_the_dry_run_plans_the_device_memory_a_merge_takes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           method: str, params: dict) -> None:
    """``--dry-run --device cuda``'s working set is what the device then holds at most (in the GPU's blocks)."""
    base, tasks = random_models(tmp_path, {"w0": (4096, 2048), "w1": (2048, 1024), "b": (2048,)}, seed=5, scale=0.01)
    recipe = recipe_dict(base, tasks, method, params)
    planned = memory_estimate(prepare(parse_recipe(recipe)), torch.device("cuda", 0))["working_bytes"]
    monkeypatch.setattr(kernels, "ENABLED", False)
    with emulated_cuda(monkeypatch) as ledger:
        merge(recipe, tmp_path / "out", device="cuda")
    assert planned / 8 < ledger.peak <= planned  # and not far below it


@pytest.mark.parametrize("kind, tie", [("llama", True), ("bert", False)])
def test_a_sharded_transformers_model_merged_on_the_device_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 kind: str, tie: bool) -> None:
    """Shards, an index, tied embeddings written once: the device's output is the CPU's, and loads."""
    import transformers

    base, tasks = tiny_hf_family(tmp_path / "m", kind, tie=tie, max_shard_size="20KB")
    cpu_and_cuda(monkeypatch, tmp_path, recipe_dict(base, tasks, "ties", {"density": 0.4}))
    model = transformers.AutoModel.from_pretrained(tmp_path / "cuda")
    assert sum(p.numel() for p in model.parameters()) > 0
