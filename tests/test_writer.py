"""The written checkpoint: layout like the base, readable by safetensors, atomic, with its metadata files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import fine_tune, load_output, merge, recipe_dict, toy_family, toy_tensors, write_model
from neuromerge_cli.errors import MergeError
from reference import load_folder, reference_merge


def layout(folder: Path) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """name → (file, dtype, shape), as safetensors reads the folder."""
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for file in files:
        with safe_open(str(folder / file), framework="pt") as f:
            for name in f.keys():
                s = f.get_slice(name)
                out[name] = (file, s.get_dtype(), tuple(s.get_shape()))
    return out


def test_single_file_base_gives_a_single_file(tmp_path: Path) -> None:
    base, tasks = toy_family(tmp_path, 2)
    merge(recipe_dict(base, tasks, "task_arithmetic"), tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert layout(tmp_path / "out") == layout(base)
    assert torch.equal(load_output(tmp_path / "out")["position_ids"], toy_tensors()["position_ids"])


def test_sharded_base_gives_the_same_shards_and_an_index(tmp_path: Path) -> None:
    base, tasks = toy_family(tmp_path, 2, shards=3)
    merge(recipe_dict(base, tasks, "ties"), tmp_path / "out")
    assert layout(tmp_path / "out") == layout(base)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert index["metadata"]["total_size"] == sum((tmp_path / "out" / f).stat().st_size for f in files) - sum(
        8 + int.from_bytes((tmp_path / "out" / f).read_bytes()[:8], "little") for f in files)


def test_shard_size_splits_a_single_file_base(tmp_path: Path) -> None:
    base, tasks = toy_family(tmp_path, 2)
    merge(recipe_dict(base, tasks, "linear"), tmp_path / "out", shard_size=600)
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(files) > 1 and "model.safetensors" not in files
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(toy_tensors()) and set(index["weight_map"].values()) == set(files)
    out, ref = load_output(tmp_path / "out"), reference_merge(base, tasks, "linear")
    for name, t in out.items():
        torch.testing.assert_close(t.double(), ref[name].double(), rtol=0, atol=1e-6)


def test_output_dtype_and_config(tmp_path: Path) -> None:
    base, tasks = toy_family(tmp_path, 2)
    config = {"model_type": "toy", "dtype": "float32", "torch_dtype": "float32", "hidden_size": 8}
    (base / "config.json").write_text(json.dumps(config))
    for t in tasks:
        (t / "config.json").write_text(json.dumps(config))
    merge(recipe_dict(base, tasks, "task_arithmetic", dtype="bfloat16"), tmp_path / "out")
    dtypes = {name: d for name, (_, d, _) in layout(tmp_path / "out").items()}
    assert dtypes.pop("position_ids") == "I64"
    assert set(dtypes.values()) == {"BF16"}
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written == {**config, "dtype": "bfloat16", "torch_dtype": "bfloat16"}
    ref = reference_merge(base, tasks, "task_arithmetic")
    out = load_output(tmp_path / "out")
    assert all(torch.equal(out[n], ref[n].float().to(torch.bfloat16)) for n in dtypes)


def test_tokenizer_and_generation_files_are_copied(tmp_path: Path) -> None:
    base, tasks = toy_family(tmp_path, 2)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "vocab.txt", "training_args.bin"):
        (base / name).write_text(f"{name} of the base")
    merge(recipe_dict(base, tasks, "linear"), tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "vocab.txt"):
        assert (tmp_path / "out" / name).read_text() == f"{name} of the base"
    assert not (tmp_path / "out" / "training_args.bin").exists()
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"config.json", "README.md", "merge_report.json"}
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\n") and "- merge" in card and "method: linear" in card  # Hub front matter


def test_tied_weights_stored_twice_are_written_twice_from_one_merge(tmp_path: Path) -> None:
    plain = toy_tensors()
    plain["lm_head.weight"] = torch.randn(20, 8, generator=torch.Generator().manual_seed(9))
    write_model(tmp_path / "plain" / "base", plain)
    tasks_plain = [write_model(tmp_path / "plain" / f"t{t}", fine_tune(plain, t)) for t in range(3)]

    def with_alias(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**tensors, "model.embed_tokens.weight": tensors["lm_head.weight"].clone()}

    write_model(tmp_path / "tied" / "base", with_alias(load_folder(tmp_path / "plain" / "base")))
    tasks = [write_model(tmp_path / "tied" / f"t{t}", with_alias(load_folder(d))) for t, d in enumerate(tasks_plain)]
    params = {"density": 0.1}  # global: counting the tied tensor twice would move the threshold
    report = merge(recipe_dict(tmp_path / "tied" / "base", tasks, "ties", params), tmp_path / "out")
    tied = report["totals"]["tied"]
    assert tied in ({"model.embed_tokens.weight": "lm_head.weight"}, {"lm_head.weight": "model.embed_tokens.weight"})
    assert set(report["tensors"]) == set(plain) - {"position_ids"} - set(tied)
    out = load_output(tmp_path / "out")
    assert layout(tmp_path / "out") == layout(tmp_path / "tied" / "base")
    assert torch.equal(out["model.embed_tokens.weight"], out["lm_head.weight"])
    ref = reference_merge(tmp_path / "plain" / "base", tasks_plain, "ties", params)
    for name in plain:  # the alias holds the same merged tensor
        torch.testing.assert_close(out[name].double(), ref[name].double(), rtol=0, atol=1e-6, msg=name)


def test_output_appears_only_at_the_end_and_no_temporary_folder_is_left(tmp_path: Path) -> None:
    base, tasks = toy_family(tmp_path / "in", 2)
    seen: list[tuple[bool, list[str]]] = []

    def progress(phase: str, *counts: int) -> None:
        seen.append(((tmp_path / "out").exists(), sorted(p.name for p in tmp_path.iterdir())))

    merge(recipe_dict(base, tasks, "ties"), tmp_path / "out", progress=progress)
    assert seen and not any(exists for exists, _ in seen)
    assert all(any(n.startswith(".out.tmp-") for n in names) for _, names in seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_a_failed_merge_leaves_nothing_and_keeps_an_existing_output(tmp_path: Path) -> None:
    base, tasks = toy_family(tmp_path / "in", 2)
    bad = load_folder(tasks[1])
    bad["layer.1.weight"][0, 0] = float("nan")
    write_model(tasks[1], bad)
    with pytest.raises(MergeError, match="layer.1.weight.*NaN"):
        merge(recipe_dict(base, tasks, "task_arithmetic"), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    with pytest.raises(MergeError, match="already exists"):
        merge(recipe_dict(base, tasks[:1], "task_arithmetic"), tmp_path / "out")
    with pytest.raises(MergeError, match="NaN"):
        merge(recipe_dict(base, tasks, "task_arithmetic"), tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "old"
    merge(recipe_dict(base, tasks[:1], "task_arithmetic"), tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_tied_weights_sharing_storage_in_a_bin(tmp_path: Path) -> None:
    """torch.save of a tied model's state dict stores one storage under two names."""
    plain = toy_tensors()
    write_model(tmp_path / "plain" / "base", plain)
    tasks_plain = [write_model(tmp_path / "plain" / f"t{t}", fine_tune(plain, t)) for t in range(2)]
    folders = []
    for i, src in enumerate([tmp_path / "plain" / "base", *tasks_plain]):
        state = load_folder(src)
        state["model.embed_tokens.weight"] = state.pop("embed.weight")
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # the same tensor object: shared storage
        folder = tmp_path / "bin" / str(i)
        folder.mkdir(parents=True)
        torch.save(state, folder / "pytorch_model.bin")
        folders.append(folder)
    report = merge(recipe_dict(folders[0], folders[1:], "ties", {"density": 0.2}), tmp_path / "out")
    assert set(report["totals"]["tied"].items()) in (
        {("lm_head.weight", "model.embed_tokens.weight")}, {("model.embed_tokens.weight", "lm_head.weight")})
    out = load_output(tmp_path / "out")
    ref = reference_merge(tmp_path / "plain" / "base", tasks_plain, "ties", {"density": 0.2})
    ref["model.embed_tokens.weight"] = ref["lm_head.weight"] = ref.pop("embed.weight")
    assert set(out) == set(ref)
    for name in out:
        torch.testing.assert_close(out[name].double(), ref[name].double(), rtol=0, atol=1e-6, msg=name)


def test_writeback_is_started_per_shard_as_the_bytes_add_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from neuromerge_cli import writer

    base, tasks = toy_family(tmp_path, 2, shards=3)
    started: list[str] = []  # the file of each writeback started
    monkeypatch.setattr(writer, "WRITEBACK_BYTES", 600)
    monkeypatch.setattr(writer, "start_writeback", lambda fd: started.append(os.readlink(f"/proc/self/fd/{fd}")))
    merge(recipe_dict(base, tasks, "task_arithmetic"), tmp_path / "out")
    written = {p.name: p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors")}
    assert {Path(f).name for f in started} <= set(written)
    # every 600 bytes of tensor data written to a shard start one writeback of that shard
    data = {name: size - 8 - int.from_bytes((tmp_path / "out" / name).read_bytes()[:8], "little")
            for name, size in written.items()}
    counts = {name: sum(Path(f).name == name for f in started) for name in written}
    assert any(size >= 600 for size in data.values())
    for name in written:
        assert (data[name] >= 600) <= counts[name] <= data[name] // 600


def test_start_writeback_leaves_the_file_as_written(tmp_path: Path) -> None:
    import os

    from neuromerge_cli.writer import start_writeback

    path = tmp_path / "f.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        os.pwrite(fd, b"x" * 100_000, 0)
        start_writeback(fd)
        os.pwrite(fd, b"y" * 10, 5)
        start_writeback(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"x" * 5 + b"y" * 10 + b"x" * (100_000 - 15)
