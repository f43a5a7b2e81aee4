"""Sharded safetensors output written in place from the plan, inside an atomically published folder."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from .checkpoints import DTYPE_NAMES
from .errors import MergeError
from .plan import Plan
from .signals import deferred_signals

if TYPE_CHECKING:
    from .distributed import World

INDEX_NAME = "model.safetensors.index.json"
WRITEBACK_BYTES = 64 << 20  # bytes written to a shard after which its writeback to disk is started


def _writeback_starter() -> Callable[[int], None]:
    """A function that starts writing a file's dirty pages to disk without waiting for them (Linux
    ``sync_file_range(SYNC_FILE_RANGE_WRITE)``); elsewhere one that does nothing.

    Started as the merge goes, the writeback overlaps the computing, and the fsync that publishes the
    output (writer.atomic_folder) finds little left to flush: on a 0.47B merge it took 1.3 s otherwise.
    """
    try:
        import ctypes

        call = ctypes.CDLL(None, use_errno=True).sync_file_range
        call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    except (OSError, AttributeError, TypeError):
        return lambda fd: None

    def start(fd: int) -> None:
        call(fd, 0, 0, 2)  # the whole file, SYNC_FILE_RANGE_WRITE; a hint: a failure is harmless

    return start


start_writeback = _writeback_starter()


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
        self._unflushed: dict[int, int] = {}  # bytes written to each file since its writeback was started
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
                fd = os.open(folder / file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                os.pwrite(fd, len(raw).to_bytes(8, "little") + raw, 0)
                os.ftruncate(fd, start + offset)
            else:
                fd = os.open(folder / file, os.O_RDWR)
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
        _pwrite_all(fd, data, offset)
        self._left[name] -= len(data)
        self._unflushed[fd] = self._unflushed.get(fd, 0) + len(data)
        if self._unflushed[fd] >= WRITEBACK_BYTES:
            start_writeback(fd)
            self._unflushed[fd] = 0

    def patch(self, name: str, row: int, positions: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite entries of a written tensor: ``values`` (CPU, planned dtype) at ``positions`` (CPU,
        ascending, in the tensor flattened from ``row`` on). The span they lie in is read and written back."""
        fd, offset, dtype, shape = self._where[name]
        if values.dtype != dtype or positions.shape != values.shape:
            raise AssertionError(f"{name}: patch of {values.dtype} {list(values.shape)} at {list(positions.shape)} "
                                 f"positions, planned {dtype}")
        size = values.element_size()
        first, last = int(positions[0]), int(positions[-1])
        start = offset + (row * math.prod(shape[1:]) + first) * size
        span = bytearray(os.pread(fd, (last - first + 1) * size, start))
        torch.frombuffer(span, dtype=torch.uint8).view(dtype)[positions - first] = values
        _pwrite_all(fd, memoryview(span), start)

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


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    written = 0
    while written < len(data):
        written += os.pwrite(fd, data[written:], offset + written)


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
        try:
            with deferred_signals():  # started whole
                self._thread.start()
        except BaseException:  # a signal came while it started: stopped again, then raised
            self.stop()
            raise

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue
            writer, names, tensor, row, event, positions = item
            try:
                if event is not None:
                    event.synchronize()
                for name in names:
                    if positions is None:
                        writer.write(name, tensor, row)
                    else:
                        writer.patch(name, row, positions, tensor)
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
        self._queue.put((writer, names, tensor, row, event, None))

    def patch(self, writer: ShardWriter, names: list[str], row: int, positions: torch.Tensor, values: torch.Tensor) -> None:
        """Queue a ShardWriter.patch of every tensor in ``names``, after the writes queued before it."""
        self._check()
        self._queue.put((writer, names, values, row, None, positions))

    def stop(self) -> None:
        """Stop the thread without raising (on the way out of a failed merge)."""
        if self._thread.is_alive():
            self._error = self._error or RuntimeError("stopped")
            self._queue.put(None)
            with deferred_signals():  # joined whole
                self._thread.join()

    def drain(self) -> None:
        """Wait until every queued block is written; raise the thread's error if any."""
        self._queue.put(None)
        with deferred_signals():  # joined whole
            self._thread.join()
        self._check()


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


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _existing_ancestor(path: Path) -> Path:
    probe = path.absolute().parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def check_free_space(outputs: list[Path], needed_each: int) -> None:
    """Refuse to start when a file system has less room than the outputs planned on it will take.

    An existing output is only removed once the new one is complete, so it does not count as room.
    """
    plans: dict[int, tuple[Path, int]] = {}  # file system (device id) -> (a folder on it, bytes planned)
    for output in outputs:
        probe = _existing_ancestor(output)
        device = probe.stat().st_dev
        folder, needed = plans.get(device, (probe, 0))
        plans[device] = (folder, needed + needed_each)
    for probe, needed in plans.values():
        margin = max(needed // 100, 16 * 2**20)  # the report and file-system overhead
        try:
            free = shutil.disk_usage(probe).free
        except OSError:
            continue  # no figure to check against: the write itself will report a full disk
        if free < needed + margin:
            raise MergeError(f"output: not enough free disk space in {probe}: the merge writes {format_size(needed)} "
                             f"(+{format_size(margin)} margin) but {format_size(free)} are free")


def _sync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` to disk, so that what is published is complete."""
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root), folder=True)


def _fsync(path: Path, folder: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        if not folder:  # some file systems cannot sync a folder; a file that cannot be synced is an error
            raise


def _remove(path: Path) -> None:
    """Delete a folder we made (or a link that was swapped into its place); never follows a link."""
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _publish(tmp: Path, output: Path, overwrite: bool) -> None:
    """Put the finished ``tmp`` at ``output``; an existing output is swapped out, then removed."""
    if not output.exists():
        os.rename(tmp, output)
        return
    if not overwrite:
        raise MergeError(f"output: {output} already exists (use --overwrite to replace it)")
    if not output.is_dir():
        raise MergeError(f"output: {output} exists and is not a folder")
    if _exchange(tmp, output):
        old = tmp  # now holds the previous output
    else:
        old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(output, old)
        try:
            os.rename(tmp, output)
        except OSError:
            os.rename(old, output)
            raise
    _remove(old)


@contextlib.contextmanager
def atomic_folder(output: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder next to ``output``; publish it as ``output`` only on success.

    An existing ``output`` is replaced only after the new folder is complete and flushed to disk;
    on any failure or signal the temporary folder (and any parent folder created for it) is
    removed and ``output`` is left as it was. A signal during the publishing step is held back
    until the step is done.
    """
    parent = output.absolute().parent
    created = [p for p in (parent, *parent.parents) if not p.exists()]
    tmp = parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
    published = False
    try:
        try:
            parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        except OSError as exc:
            raise MergeError(f"output: cannot create a folder in {parent} ({exc.strerror or exc})") from None
        try:
            yield tmp
            _sync_tree(tmp)
            with deferred_signals(published=True):
                _publish(tmp, output, overwrite)
                published = True
                _fsync(parent, folder=True)
        except OSError as exc:
            if exc.filename:
                raise MergeError(f"{exc.filename}: {exc.strerror or exc} (while writing the output {output})") from None
            raise MergeError(f"output: cannot write {output} ({exc.strerror or exc})") from None
    finally:
        _remove(tmp)
        if not published:
            for folder in created:  # deepest first; stops at the first one that is not empty
                try:
                    folder.rmdir()
                except OSError:
                    break
