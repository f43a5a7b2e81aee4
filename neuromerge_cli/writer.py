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
from .errors import Interrupted, MergeError
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


HANDLED_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


class _SignalState:
    """What the handler of ``signals_as_exceptions`` does now (signals only ever run in the main thread)."""

    def __init__(self) -> None:
        self.raised = False  # an Interrupted is unwinding: later signals must not cut its cleanup short
        self.deferring = 0  # inside ``deferred_signals``: remember the signal, raise it afterwards
        self.pending: int | None = None

    def handler(self, signum: int, frame: object) -> None:
        if self.raised:
            return
        if self.deferring:
            self.pending = self.pending or signum
            return
        self.raised = True
        raise Interrupted(signum)


_state: _SignalState | None = None


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into ``Interrupted`` so that cleanup code runs.

    Python runs signal handlers in the main thread whichever thread the signal hit, so a signal
    that lands in a reader thread still interrupts the main thread. Only the first signal raises:
    the ones that follow while it unwinds are ignored, so cleanup is never cut short.
    """
    global _state
    state, outer = _SignalState(), _state
    previous = {}
    try:
        for sig in HANDLED_SIGNALS:
            previous[sig] = signal.signal(sig, state.handler)
    except ValueError:  # not in the main thread: leave signals alone
        pass
    _state = state if previous else outer
    try:
        yield
    finally:
        _state = outer
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold back a signal for a step that must not be cut in half; raise it once the step is done."""
    state = _state
    if state is None:
        yield
        return
    state.deferring += 1
    try:
        yield
    finally:
        state.deferring -= 1
    if not state.deferring and state.pending is not None and not state.raised:
        signum, state.pending, state.raised = state.pending, None, True
        raise Interrupted(signum, published=True)


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
            with deferred_signals():
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
