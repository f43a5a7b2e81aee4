"""Sharded safetensors output written in place from the plan, inside an atomically published folder."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import uuid
from pathlib import Path
from typing import Iterator

import torch

from .checkpoints import DTYPE_NAMES
from .errors import MergeError
from .plan import Plan

INDEX_NAME = "model.safetensors.index.json"


class ShardWriter:
    """Writes every planned tensor at its place in its shard.

    Each shard's header is written from the plan before any tensor is computed, so tensors can
    arrive in any order and the writer never holds more than the tensor it is given.
    """

    def __init__(self, folder: Path, plan: Plan) -> None:
        self.folder = folder
        self.plan = plan
        self._where: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        self._files: dict[str, int] = {}
        self._pending = {t.name for t in plan.tensors}
        by_name = plan.by_name()
        for file, names in plan.shards.items():
            header: dict[str, object] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name in names:
                t = by_name[name]
                header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                                "data_offsets": [offset, offset + t.nbytes]}
                offset += t.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            start = 8 + len(raw)
            fd = os.open(folder / file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._files[file] = fd
            os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
            os.ftruncate(fd, start + offset)
            for name in names:
                begin, _ = header[name]["data_offsets"]  # type: ignore[index]
                t = by_name[name]
                self._where[name] = (fd, start + begin, t.dtype, t.shape)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor (CPU, planned dtype and shape)."""
        fd, offset, dtype, shape = self._where[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise AssertionError(f"{name}: got {tensor.dtype} {list(tensor.shape)}, planned {dtype} {list(shape)}")
        data = memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], offset + written)
        self._pending.discard(name)

    def close(self) -> None:
        """Close every shard and write the index; every planned tensor must have been written."""
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()
        if self._pending:
            raise AssertionError(f"tensors never written: {sorted(self._pending)[:3]}")
        if self.plan.sharded:
            index = {"metadata": {"total_size": self.plan.bytes_out},
                     "weight_map": {t.name: t.shard for t in self.plan.tensors}}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived during a merge."""


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Turn SIGTERM (and SIGINT) into an exception so that cleanup code runs."""

    def handler(signum: int, frame: object) -> None:
        raise Interrupted(signal.Signals(signum).name)

    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not in the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def check_output_location(output: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an existing output (without overwrite) and an output inside or over an input."""
    out = output.resolve()
    for folder in inputs:
        folder = folder.resolve()
        if out == folder or folder in out.parents or out in folder.parents:
            raise MergeError(f"output: {output} overlaps the input folder {folder}")
    if output.exists() and not overwrite:
        raise MergeError(f"output: {output} already exists (use --overwrite to replace it)")
    if output.exists() and not output.is_dir():
        raise MergeError(f"output: {output} exists and is not a folder")


@contextlib.contextmanager
def atomic_folder(output: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder next to ``output``; publish it as ``output`` only on success.

    An existing ``output`` is replaced only after the new folder is complete; on any failure or
    signal the temporary folder is removed and ``output`` is left as it was.
    """
    parent = output.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MergeError(f"output: cannot create {parent} ({exc.strerror or exc})") from None
    tmp = parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if output.exists():
            if not overwrite:
                raise MergeError(f"output: {output} already exists (use --overwrite to replace it)")
            old = parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(output, old)
            os.rename(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
