"""Model references → local folders, and checkpoints indexed from their headers and read lazily.

A reference is a local folder or a Hugging Face Hub id (optionally ``@revision``). Hub ids go
through ``huggingface_hub`` (its normal cache; ``HF_HUB_OFFLINE=1`` works from the cache) and
fetch only weights, config, tokenizer and generation files.
"""

from __future__ import annotations

import json
import os
import re
import struct
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import MergeError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
META_PATTERNS = [
    "config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
    "vocab.*", "merges.txt", "*.model", "chat_template.*", "preprocessor_config.json",
]
# Only the transformers weight names: repos may also hold other copies (consolidated.safetensors, adapters).
SAFETENSORS_PATTERNS = ["model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json"]
BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model*.bin.index.json"]
HUB_ID = re.compile(r"^[\w.\-]+(/[\w.\-]+)?(@[\w.\-/]+)?$")
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class Source:
    """Where a reference resolved to: a local folder, and the Hub revision (commit) if any."""

    reference: str
    path: Path
    revision: str | None = None
    hub: bool = False

    def describe(self) -> dict[str, Any]:
        return {"reference": self.reference, "path": str(self.path), "revision": self.revision,
                "source": "hub" if self.hub else "local"}


def resolve(reference: str, download: bool = True) -> Source:
    """Turn a recipe reference into a local folder (downloading from the Hub if needed).

    With ``download=False`` a Hub id resolves only from the local Hub cache (nothing is fetched).
    """
    local = Path(os.path.expanduser(reference))
    if local.exists():
        if not local.is_dir():
            raise MergeError(f"{reference}: not a folder (a model is a folder with config.json and weights)")
        return Source(reference, local.resolve())
    if reference.startswith((".", "/", "~")) or not HUB_ID.match(reference):
        raise MergeError(f"{reference}: no such folder")
    return _resolve_hub(reference, download)


def _resolve_hub(reference: str, download: bool = True) -> Source:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    repo_id, _, revision = reference.partition("@")
    try:
        path = Path(snapshot_download(repo_id, revision=revision or None, local_files_only=not download,
                                      allow_patterns=META_PATTERNS + SAFETENSORS_PATTERNS))
        if not any(path.glob("model*.safetensors")):
            path = Path(snapshot_download(repo_id, revision=revision or None, local_files_only=not download,
                                          allow_patterns=META_PATTERNS + BIN_PATTERNS))
    except HFValidationError as exc:
        raise MergeError(f"{reference}: no such folder, and not a valid Hub id ({str(exc).splitlines()[0]})") from None
    except LocalEntryNotFoundError:
        if not download:
            raise MergeError(f"{reference}: not in the Hub cache, and a dry run downloads nothing "
                             f"(fetch it first, e.g. `hf download {repo_id}`)") from None
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "not in the Hub cache and HF_HUB_OFFLINE is set" if offline else "not in the Hub cache and the Hub cannot be reached"
        raise MergeError(f"{reference}: no such local folder, and {why}") from None
    except RepositoryNotFoundError:
        raise MergeError(f"{reference}: no such local folder or Hub repository (or it is private: log in)") from None
    except RevisionNotFoundError:
        raise MergeError(f"{reference}: revision '{revision}' not found on the Hub") from None
    except (HfHubHTTPError, OSError) as exc:
        raise MergeError(f"{reference}: download failed ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from None
    return Source(reference, path, revision=path.name, hub=True)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives, read from headers only."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0  # absolute byte offset in a safetensors file (unused for .bin)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check it against the file size (catches truncation)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MergeError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER, size - 8):
                raise MergeError(f"{path}: corrupted safetensors header (header length {n} does not fit the file)")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MergeError(f"{path}: corrupted safetensors header (not valid JSON)") from None
    except OSError as exc:
        raise MergeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(header, dict):
        raise MergeError(f"{path}: corrupted safetensors header (not a mapping)")
    header.pop("__metadata__", None)
    tensors: dict[str, TensorInfo] = {}
    end = 0
    for name, entry in header.items():
        try:
            dtype_name = entry["dtype"]
            shape = tuple(int(s) for s in entry["shape"])
            begin, stop = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise MergeError(f"{path}: corrupted safetensors header entry for tensor '{name}'") from None
        if dtype_name not in SAFETENSORS_DTYPES:
            raise MergeError(f"{path}: tensor '{name}' has dtype {dtype_name!r}, which neuromerge does not support "
                             f"(supported: {', '.join(SAFETENSORS_DTYPES)})")
        dtype = SAFETENSORS_DTYPES[dtype_name]
        info = TensorInfo(name, path, dtype, shape, 8 + n + begin)
        if stop - begin != info.nbytes or begin < 0 or any(d < 0 for d in shape):
            raise MergeError(f"{path}: corrupted safetensors header: tensor '{name}' has a wrong byte range")
        end = max(end, stop)
        tensors[name] = info
    if 8 + n + end > size:
        raise MergeError(f"{path}: truncated safetensors file ({size} bytes, header needs {8 + n + end})")
    return tensors


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad pickles
        text = str(exc)
        needs = re.search(r"\bGLOBAL ([\w.]+)", text)  # torch names the class or function it refused
        if needs or ("Weights only load failed" in text and "Unsupported operand" not in text):
            what = needs.group(1) if needs else "not plain tensors"
            raise MergeError(f"{path}: refused: the file needs code to unpickle ({what}); only plain "
                             "tensors are loaded (convert it to safetensors where you trust it)") from None
        raise MergeError(f"{path}: cannot read PyTorch checkpoint: corrupted or not a checkpoint "
                         f"({type(exc).__name__})") from None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise MergeError(f"{path}: not a state dict")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


@dataclass
class Checkpoint:
    """A model folder: its tensors (from headers), its config, and a lazy reader."""

    source: Source
    tensors: dict[str, TensorInfo]
    config: dict[str, Any] | None
    sharded: bool
    _bins: dict[Path, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    _fds: dict[Path, int] = field(default_factory=dict, repr=False, compare=False)

    @property
    def path(self) -> Path:
        return self.source.path

    def _open(self, file: Path) -> int:
        """A read-only descriptor of ``file``, opened once (blocks of rows make thousands of reads) and
        closed when the checkpoint is garbage-collected."""
        fd = self._fds.get(file)
        if fd is None:
            if not self._fds:
                weakref.finalize(self, _close_all, self._fds)
            fd = os.open(file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            if self._fds.setdefault(file, fd) != fd:  # another thread opened it meanwhile
                os.close(fd)
                fd = self._fds[file]
        return fd

    def read(self, name: str, rows: tuple[int, int] | None = None, pin: bool = False) -> torch.Tensor:
        """One tensor (or the block of its first-dimension ``rows`` [start, stop)) in its storage dtype,
        on the CPU, in memory the caller owns (page-locked when ``pin``, for asynchronous copies to a GPU).

        A safetensors tensor is read with one ``readinto`` straight into the returned tensor's memory.
        """
        info = self.tensors[name]
        shape = info.shape
        begin, nbytes = info.offset, info.nbytes
        if rows is not None:
            row_bytes = info.nbytes // shape[0] if shape and shape[0] else 0
            shape = (rows[1] - rows[0], *shape[1:])
            begin, nbytes = info.offset + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes
        if info.file.suffix == ".bin":
            t = self._bins[info.file][name]
            t = t if rows is None else t[rows[0]:rows[1]]
            return t.contiguous().pin_memory() if pin else t.contiguous()
        out = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
        view, got = memoryview(out.numpy()), 0
        try:
            if hasattr(os, "preadv"):  # positional reads on one descriptor per file, shared by threads
                fd = self._open(info.file)
                while got < nbytes:
                    n = os.preadv(fd, [view[got:]], begin + got)
                    if not n:
                        break
                    got += n
            else:
                with open(info.file, "rb", buffering=0) as f:
                    f.seek(begin)
                    while got < nbytes:
                        n = f.readinto(view[got:])
                        if not n:
                            break
                        got += n
        except OSError as exc:
            raise MergeError(f"{info.file}: cannot read tensor '{name}' ({exc.strerror or exc})") from None
        if got != nbytes:
            raise MergeError(f"{info.file}: truncated while reading tensor '{name}'")
        return out.view(info.dtype).reshape(shape)


def _close_all(fds: dict[Path, int]) -> None:
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def _index_files(folder: Path, index_name: str) -> list[Path] | None:
    index = folder / index_name
    if not index.exists():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise MergeError(f"{index}: corrupted index (expected a JSON object with 'weight_map')")
    files = []
    for shard in dict.fromkeys(weight_map.values()):
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise MergeError(f"{index}: shard '{shard}' is not a file name in the model folder")
        path = folder / shard
        if not path.exists():
            raise MergeError(f"{index}: points at missing shard '{shard}'")
        files.append(path)
    return files


def open_checkpoint(source: Source) -> Checkpoint:
    """Index a model folder: safetensors (single or sharded) or pytorch_model*.bin."""
    try:
        return _open_checkpoint(source)
    except OSError as exc:  # an unreadable folder or file (permissions, I/O error)
        raise MergeError(f"{exc.filename or source.path}: cannot read ({exc.strerror or exc})") from None


def _open_checkpoint(source: Source) -> Checkpoint:
    folder = source.path
    config = None
    if (folder / "config.json").exists():
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            raise MergeError(f"{folder / 'config.json'}: not valid JSON") from None
        if not isinstance(config, dict):
            raise MergeError(f"{folder / 'config.json'}: expected a JSON object, got {type(config).__name__}")
    tensors: dict[str, TensorInfo] = {}
    bins: dict[Path, dict[str, torch.Tensor]] = {}
    files = _index_files(folder, "model.safetensors.index.json")
    sharded = files is not None
    if files is None:
        single = folder / "model.safetensors"
        files = [single] if single.exists() else sorted(folder.glob("*.safetensors"))
    if files:
        for f in files:
            for name, info in read_safetensors_header(f).items():
                tensors.setdefault(name, info)
    else:
        bin_files = _index_files(folder, "pytorch_model.bin.index.json")
        sharded = bin_files is not None
        if bin_files is None:
            bin_files = sorted(folder.glob("pytorch_model*.bin"))
        if not bin_files:
            raise MergeError(f"{source.reference}: no weights found in {folder} (expected *.safetensors or pytorch_model*.bin)")
        for f in bin_files:
            bins[f] = _load_bin(f)
            for name, t in bins[f].items():
                tensors.setdefault(name, TensorInfo(name, f, t.dtype, tuple(t.shape)))
    return Checkpoint(source, tensors, config, sharded, bins)
