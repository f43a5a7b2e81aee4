"""Resolving references (local and Hub, offline) and indexing/reading checkpoints lazily."""

from __future__ import annotations

import fnmatch
import io
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import neuromerge_cli.checkpoints as checkpoints
from helpers import hub_cache, toy_tensors, write_model
from neuromerge_cli.checkpoints import open_checkpoint, read_safetensors_header, resolve
from neuromerge_cli.errors import MergeError

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.f32": torch.randn(3, 4, generator=g),
        "b.f16": torch.randn(5, generator=g).half(),
        "c.bf16": torch.randn(2, 3, 2, generator=g).bfloat16(),
        "d.i64": torch.arange(6).reshape(2, 3),
        "e.bool": torch.tensor([True, False, True]),
        "f.u8": torch.arange(7, dtype=torch.uint8),
        "g.scalar": torch.tensor(2.5),
        "h.empty": torch.zeros(0, 4),
        "i.f64": torch.randn(3, generator=g, dtype=torch.float64),
    }


def test_header_and_reads_agree_with_safetensors(tmp_path: Path) -> None:
    tensors = mixed_tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    infos = read_safetensors_header(tmp_path / "model.safetensors")
    ck = open_checkpoint(resolve(str(tmp_path)))
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert sorted(infos) == sorted(f.keys())
        for name in f.keys():
            theirs = f.get_tensor(name)
            assert infos[name].dtype == theirs.dtype and infos[name].shape == tuple(theirs.shape), name
            mine = ck.read(name)
            assert mine.dtype == theirs.dtype and torch.equal(mine, theirs), name
    assert not ck.sharded and ck.config is None


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open descriptors in /proc")
def test_reads_share_one_descriptor_per_file_closed_with_the_checkpoint(tmp_path: Path) -> None:
    import gc
    from concurrent.futures import ThreadPoolExecutor

    tensors = {"a": torch.arange(600.0).reshape(30, 20), "b": torch.ones(7)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    before = len(os.listdir("/proc/self/fd"))
    ck = open_checkpoint(resolve(str(tmp_path)))
    with ThreadPoolExecutor(4) as pool:  # blocks of rows from several threads at once
        blocks = list(pool.map(lambda r: ck.read("a", (r, r + 3)), range(0, 30, 3)))
    assert torch.equal(torch.cat(blocks), tensors["a"]) and torch.equal(ck.read("b"), tensors["b"])
    assert len(os.listdir("/proc/self/fd")) == before + 1
    del ck
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before


def test_sharded_safetensors_index(tmp_path: Path) -> None:
    tensors = toy_tensors()
    write_model(tmp_path, tensors, shards=3)
    ck = open_checkpoint(resolve(str(tmp_path)))
    assert ck.sharded and ck.config == {"model_type": "toy"}
    assert set(ck.tensors) == set(tensors)
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    for name, t in tensors.items():
        assert ck.tensors[name].file.name == weight_map[name]
        assert torch.equal(ck.read(name), t)


def test_index_pointing_at_a_missing_shard(tmp_path: Path) -> None:
    write_model(tmp_path, toy_tensors(), shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MergeError, match="model-00002-of-00002.safetensors"):
        open_checkpoint(resolve(str(tmp_path)))


class CountingFile(io.FileIO):
    read_bytes = 0

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        data = super().read(size)
        CountingFile.read_bytes += len(data)
        return data

    def readinto(self, buffer) -> int:  # type: ignore[override]
        n = super().readinto(buffer)
        CountingFile.read_bytes += n or 0
        return n


def test_indexing_reads_headers_only_and_data_is_read_on_demand(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = {"w": torch.zeros(256, 256), "b": torch.zeros(256)}
    write_model(tmp_path, big)
    file = tmp_path / "model.safetensors"
    header_len = 8 + int.from_bytes(file.read_bytes()[:8], "little")
    monkeypatch.setattr(checkpoints, "open", lambda path, mode="r": CountingFile(path, mode.replace("b", "")), raising=False)
    CountingFile.read_bytes = 0
    ck = open_checkpoint(resolve(str(tmp_path)))
    assert 0 < CountingFile.read_bytes <= header_len  # no tensor data at index time
    monkeypatch.undo()
    # the data is read when asked for: bytes changed after indexing show up
    info = ck.tensors["w"]
    with open(file, "r+b") as f:
        f.seek(info.offset)
        f.write(torch.full((256, 256), 7.0).numpy().tobytes())
    assert torch.equal(ck.read("w"), torch.full((256, 256), 7.0))


def test_pytorch_bin_single_and_sharded(tmp_path: Path) -> None:
    tensors = toy_tensors()
    single = tmp_path / "single"
    single.mkdir()
    torch.save(tensors, single / "pytorch_model.bin")
    ck = open_checkpoint(resolve(str(single)))
    assert set(ck.tensors) == set(tensors) and not ck.sharded
    assert all(torch.equal(ck.read(n), t) and ck.tensors[n].dtype == t.dtype for n, t in tensors.items())

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = list(tensors)
    weight_map = {}
    for i, part in enumerate((names[:3], names[3:])):
        file = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({n: tensors[n] for n in part}, sharded / file)
        weight_map.update({n: file for n in part})
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ck = open_checkpoint(resolve(str(sharded)))
    assert ck.sharded and set(ck.tensors) == set(tensors)
    assert all(torch.equal(ck.read(n), t) for n, t in tensors.items())


class Payload:
    """Anything that is not a plain tensor: unpickling it would run code."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.getcwd, ())


def test_bin_is_loaded_with_weights_only(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(2), "evil": Payload()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(MergeError, match="refused"):
        open_checkpoint(resolve(str(tmp_path)))


def test_corrupted_and_truncated_safetensors(tmp_path: Path) -> None:
    write_model(tmp_path / "t", {"w": torch.zeros(64)})
    data = (tmp_path / "t" / "model.safetensors").read_bytes()
    (tmp_path / "t" / "model.safetensors").write_bytes(data[:-8])
    with pytest.raises(MergeError, match="truncated"):
        open_checkpoint(resolve(str(tmp_path / "t")))
    (tmp_path / "t" / "model.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(MergeError, match="corrupted safetensors header"):
        open_checkpoint(resolve(str(tmp_path / "t")))


def test_local_references(tmp_path: Path) -> None:
    write_model(tmp_path / "m", {"w": torch.zeros(2)})
    source = resolve(str(tmp_path / "m"))
    assert source.path == (tmp_path / "m").resolve() and source.revision is None and not source.hub
    with pytest.raises(MergeError, match="not a folder"):
        resolve(str(tmp_path / "m" / "config.json"))
    with pytest.raises(MergeError, match="no such folder"):
        resolve("./does/not/exist")
    with pytest.raises(MergeError, match=r"^my--model: no such folder, and not a valid Hub id \(Cannot have -- or \.\."):
        resolve("my--model")  # huggingface_hub's own id validation, not a traceback
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeError, match="no weights found"):
        open_checkpoint(resolve(str(tmp_path / "empty")))


# ---- the Hub, without network -------------------------------------------------------------------

@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hub cache laid out as huggingface_hub does, and huggingface_hub switched offline onto it.

    huggingface_hub reads HF_HUB_OFFLINE / HF_HUB_CACHE at import: patch its constants.
    """
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    model = write_model(tmp_path / "src", toy_tensors())
    (model / "tokenizer.json").write_text("{}")
    hub_cache(cache, "org/name", model, COMMIT)
    old = write_model(tmp_path / "old", {"w": torch.zeros(3)})
    hub_cache(cache, "org/name", old, OTHER, refs=())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hub_id_resolves_to_the_cached_snapshot_offline(offline_cache: Path) -> None:
    snapshot = offline_cache / "models--org--name" / "snapshots" / COMMIT
    source = resolve("org/name")
    assert source.hub and source.revision == COMMIT
    assert source.path.resolve() == snapshot.resolve()
    ck = open_checkpoint(source)
    assert set(ck.tensors) == set(toy_tensors())
    assert torch.equal(ck.read("layer.0.weight"), toy_tensors()["layer.0.weight"])
    assert source.describe() == {"reference": "org/name", "path": str(source.path), "revision": COMMIT, "source": "hub"}


def test_hub_revision_pin(offline_cache: Path) -> None:
    source = resolve(f"org/name@{OTHER}")
    assert source.revision == OTHER
    assert set(open_checkpoint(source).tensors) == {"w"}


def test_hub_id_not_in_the_cache_is_one_clear_error(offline_cache: Path) -> None:
    with pytest.raises(MergeError) as info:
        resolve("org/missing")
    msg = str(info.value)
    assert msg.startswith("org/missing:") and "HF_HUB_OFFLINE" in msg and "\n" not in msg
    with pytest.raises(MergeError, match="org/name@deadbeef"):
        resolve("org/name@deadbeef")


REPO_FILES = [
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.txt", "merges.txt", "spiece.model", "model.safetensors", "model-00001-of-00002.safetensors",
    "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5",
    "flax_model.msgpack", "rust_model.ot", "model.onnx", "onnx/model.onnx", "README.md", ".gitattributes",
    "training_args.bin", "optimizer.pt", "model.gguf", "consolidated.safetensors", "adapter_model.safetensors",
    "model.fp16.safetensors",
]
WANTED = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "vocab.txt", "merges.txt", "spiece.model"}


def fake_snapshot(folder: Path, calls: list[dict]):  # type: ignore[no-untyped-def]
    def snapshot_download(repo_id: str, revision: str | None = None, allow_patterns: list[str] | None = None, **kw):  # type: ignore[no-untyped-def]
        calls.append({"repo_id": repo_id, "revision": revision, "allow_patterns": list(allow_patterns or []), **kw})
        return str(folder)
    return snapshot_download


def requested(patterns: list[str]) -> set[str]:
    return {f for f in REPO_FILES if any(fnmatch.fnmatch(f, p) for p in patterns)}


def test_hub_download_asks_only_for_weights_config_tokenizer_and_generation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls: list[dict] = []
    folder = tmp_path / "snapshots" / COMMIT
    write_model(folder, {"w": torch.zeros(2)})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot(folder, calls))
    source = resolve("org/name@v1.0")
    assert source.revision == COMMIT and source.path == folder
    assert len(calls) == 1 and calls[0]["repo_id"] == "org/name" and calls[0]["revision"] == "v1.0"
    assert requested(calls[0]["allow_patterns"]) == WANTED | {
        "model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json"}


def test_hub_falls_back_to_pytorch_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls: list[dict] = []
    folder = tmp_path / "snapshots" / COMMIT
    folder.mkdir(parents=True)
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot(folder, calls))
    source = resolve("org/name")
    assert len(calls) == 2 and calls[0]["revision"] is None
    assert requested(calls[1]["allow_patterns"]) == WANTED | {"pytorch_model.bin", "pytorch_model.bin.index.json"}
    assert set(open_checkpoint(source).tensors) == {"w"}
