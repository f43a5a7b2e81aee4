"""Sharded safetensors output written in place from the plan, inside an atomically published folder."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

from .checkpoints import DTYPE_NAMES
from .errors import MergeError
from .plan import Plan

if TYPE_CHECKING:
    from .distributed import World

INDEX_NAME = "model.safetensors.index.json"


class ShardWriter:
    """Writes every planned tensor at its place in its shard.

    Each shard's header is written from the plan before any tensor is computed, so tensors (or
    blocks of their rows) can arrive in any order and the writer never holds more than the block it
    is given. Several processes can share the files: one creates them (``create=True``), the others
    open them afterwards and each writes the tensors it ``owns``.
    """

    def __init__(self, folder: Path, plan: Plan, create: bool = True, owns: set[str] | None = None) -> None:
        self.folder = folder
        self.plan = plan
        self.create = create
        self._where: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        self._files: dict[str, int] = {}
        self._left: dict[str, int] = {t.name: t.nbytes for t in plan.tensors if owns is None or t.name in owns}
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
            if create:
                fd = os.open(folder / file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
                os.ftruncate(fd, start + offset)
            else:
                fd = os.open(folder / file, os.O_WRONLY)
            self._files[file] = fd
            for name in names:
                begin, _ = header[name]["data_offsets"]  # type: ignore[index]
                t = by_name[name]
                self._where[name] = (fd, start + begin, t.dtype, t.shape)

    def write(self, name: str, tensor: torch.Tensor, row: int = 0) -> None:
        """Write one tensor (CPU, planned dtype and shape), or the block of its rows from ``row`` on."""
        fd, offset, dtype, shape = self._where[name]
        rows = tensor.shape[0] if tensor.ndim else 1
        if (tensor.dtype != dtype or tuple(tensor.shape[1:]) != shape[1:] or tensor.ndim != len(shape)
                or (row + rows > (shape[0] if shape else 1))):
            raise AssertionError(f"{name}: got {tensor.dtype} {list(tensor.shape)} at row {row}, "
                                 f"planned {dtype} {list(shape)}")
        data = memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        if row:
            offset += row * (len(data) // rows)
        written = 0
        while written < len(data):
            written += os.pwrite(fd, data[written:], offset + written)
        self._left[name] -= len(data)

    def close(self, write_index: bool = True) -> None:
        """Close every shard and write the index; every tensor this writer owns must have been written."""
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()
        missing = sorted(n for n, left in self._left.items() if left)
        if missing:
            raise AssertionError(f"tensors never written: {missing[:3]}")
        if self.plan.sharded and write_index:
            index = {"metadata": {"total_size": self.plan.bytes_out},
                     "weight_map": {t.name: t.shard for t in self.plan.tensors}}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()


class AsyncWriter:
    """Writes blocks on a background thread, at most ``depth`` blocks behind the producer.

    A block may come with a CUDA event: the thread waits for it (the block's asynchronous copy to
    page-locked host memory) before writing. An error in the thread is raised on the next call.
    """

    def __init__(self, depth: int = 2) -> None:
        import queue
        import threading

        self._queue: "queue.Queue[tuple | None]" = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="neuromerge-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue
            writer, names, tensor, row, event = item
            try:
                if event is not None:
                    event.synchronize()
                for name in names:
                    writer.write(name, tensor, row)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the producer
                self._error = exc

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, writer: ShardWriter, names: list[str], tensor: torch.Tensor, row: int = 0,
              event: object = None) -> None:
        """Queue ``tensor`` to be written by ``writer`` at ``row`` of every tensor in ``names`` (a tensor
        and its aliases)."""
        self._check()
        self._queue.put((writer, names, tensor, row, event))

    def stop(self) -> None:
        """Stop the thread without raising (on the way out of a failed merge)."""
        if self._thread.is_alive():
            self._error = self._error or RuntimeError("stopped")
            self._queue.put(None)
            self._thread.join()

    def drain(self) -> None:
        """Wait until every queued block is written; raise the thread's error if any."""
        self._queue.put(None)
        self._thread.join()
        self._check()


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


@contextlib.contextmanager
def shared_folder(output: Path, overwrite: bool, world: "World") -> Iterator[Path]:
    """``atomic_folder`` for every rank of a multi-process merge: rank 0 creates and publishes it,
    the others write into it (the caller holds a barrier before rank 0 leaves the block)."""
    if world.rank == 0:
        with atomic_folder(output, overwrite) as folder:
            world.broadcast(str(folder))
            yield folder
    else:
        yield Path(world.broadcast(""))


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
