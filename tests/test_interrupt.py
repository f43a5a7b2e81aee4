"""Interruptions and --overwrite: a signal or a failure never loses the previous output or leaves a partial one."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import fine_tune, toy_family, toy_tensors, write_model, write_recipe
from neuromerge_cli import writer
from neuromerge_cli.cli import app
from neuromerge_cli.engine import MergeOptions, prepare, run_merge
from neuromerge_cli.errors import Interrupted
from neuromerge_cli.recipe import load_recipe
from neuromerge_cli.signals import signals_as_exceptions
from neuromerge_cli.writer import AsyncWriter, atomic_folder

MANY = 2000  # tensors: enough per-tensor work that a merge lasts well beyond the moment we signal it


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A base and two fine-tuned models with many small tensors."""
    root = tmp_path_factory.mktemp("many")
    g = torch.Generator().manual_seed(0)
    tensors = {f"layers.{i}.weight": torch.randn(8, 8, generator=g) for i in range(MANY)}
    base = write_model(root / "base", tensors)
    return base, [write_model(root / f"task{t}", fine_tune(tensors, t)) for t in range(2)]


def start(recipe: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "neuromerge_cli", "run", str(recipe), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the merge ended before it could be interrupted: {proc.communicate()}"
        assert time.monotonic() < deadline, "the merge never reached the point to interrupt"
        time.sleep(0.005)


def temporary_folders(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(".merged.")]


def check_interrupted(proc: subprocess.Popen, sig: signal.Signals) -> None:
    _, stderr = proc.communicate(timeout=120)
    assert "Traceback" not in stderr, stderr
    assert stderr.splitlines()[-1] == (f"error: interrupted ({sig.name}): no output was written and any "
                                       "previous output is unchanged"), stderr
    assert proc.returncode == 128 + sig


def test_sigint_during_statistics_leaves_nothing(tmp_path: Path, many: tuple[Path, list[Path]]) -> None:
    base, tasks = many
    out = tmp_path / "merged"
    recipe = write_recipe(tmp_path / "recipe.yaml", base, tasks, "ties", {"density": 0.5}, output=out)
    before = snapshot(tmp_path)
    proc = start(recipe)
    wait_for(lambda: bool(temporary_folders(tmp_path)), proc)  # the merge has begun its statistics passes
    proc.send_signal(signal.SIGINT)
    check_interrupted(proc, signal.SIGINT)
    assert snapshot(tmp_path) == before


def test_sigterm_while_writing_keeps_previous_output(tmp_path: Path, many: tuple[Path, list[Path]]) -> None:
    base, tasks = many
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the previous, complete output")
    recipe = write_recipe(tmp_path / "recipe.yaml", base, tasks, "task_arithmetic", output=out)
    before = snapshot(tmp_path)
    proc = start(recipe, "--overwrite")

    def writing() -> bool:
        return any((tmp / "model.safetensors").exists() for tmp in temporary_folders(tmp_path))

    wait_for(writing, proc)  # the merge pass is writing the new shard
    proc.send_signal(signal.SIGTERM)
    check_interrupted(proc, signal.SIGTERM)
    assert snapshot(tmp_path) == before


def test_signal_to_the_reader_thread_stops_the_merge(tmp_path: Path) -> None:
    """A signal that lands in the prefetch thread still interrupts the main thread, which cleans up."""
    base, tasks = toy_family(tmp_path / "in", 2)
    out = tmp_path / "merged"
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", base, tasks, "task_arithmetic"))
    sent = []
    handler_before = signal.getsignal(signal.SIGTERM)

    def progress(phase: str, done: int, *rest: int) -> None:
        readers = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()]
        if phase == "merge" and done >= 1 and readers and not sent:
            sent.append(readers[0].name)
            signal.pthread_kill(readers[0].ident, signal.SIGTERM)

    with pytest.raises(Interrupted) as caught:
        run_merge(prepare(recipe), MergeOptions(out, "cpu", progress=progress))
        time.sleep(5)  # not reached when the signal interrupts the merge
    assert sent and caught.value.signum == signal.SIGTERM and not caught.value.published
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "recipe.yaml"]
    assert signal.getsignal(signal.SIGTERM) is handler_before  # the handler was restored


def test_second_signal_does_not_cut_cleanup_short() -> None:
    cleaned = []
    with pytest.raises(Interrupted):
        with signals_as_exceptions():
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            finally:
                os.kill(os.getpid(), signal.SIGTERM)  # ignored while the first one unwinds
                time.sleep(0.01)
                cleaned.append(True)
    assert cleaned == [True]


def test_signal_while_publishing_is_held_until_the_output_is_complete(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "weights").write_text("old")
    publish = writer._publish

    def publish_with_signal(tmp: Path, output: Path, overwrite: bool) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs here, in the middle of publishing
        publish(tmp, output, overwrite)

    monkeypatch.setattr(writer, "_publish", publish_with_signal)
    with pytest.raises(Interrupted) as caught:
        with signals_as_exceptions(), atomic_folder(out, overwrite=True) as tmp:
            (tmp / "weights").write_text("new")
    assert caught.value.published
    assert (out / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_overwrite_swaps_in_the_new_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool) -> None:
    if not exchange:
        monkeypatch.setattr(writer, "_exchange", lambda a, b: False)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old-only").write_text("old")
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "weights").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["weights"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_failed_second_rename_restores_the_previous_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(writer, "_exchange", lambda a, b: False)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "weights").write_text("old")
    rename = os.rename

    def failing_rename(src: Path, dst: Path) -> None:
        if Path(src).name.startswith(".merged.tmp-"):
            raise OSError(28, "No space left on device")
        rename(src, dst)

    monkeypatch.setattr(writer.os, "rename", failing_rename)
    with pytest.raises(writer.MergeError, match=r"^output: cannot write .*merged \(No space left on device\)$"):
        with atomic_folder(out, overwrite=True) as tmp:
            (tmp / "weights").write_text("new")
    assert (out / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def _run(*args: str) -> int:
    result = CliRunner().invoke(app, ["run", *args, "-q"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code


def test_overwrite_replaces_only_after_a_successful_run(tmp_path: Path) -> None:
    base, tasks = toy_family(tmp_path / "in", 2)
    out = tmp_path / "merged"
    first = write_recipe(tmp_path / "linear.yaml", base, tasks, "linear", output=out)
    assert _run(str(first)) == 0
    previous = snapshot(out)
    # A failing overwrite (NaN in an input) leaves the previous output as it was.
    bad = fine_tune(toy_tensors(0), 9)
    bad["layer.0.weight"][0, 0] = float("nan")
    broken = write_model(tmp_path / "in" / "broken", bad)
    failing = write_recipe(tmp_path / "bad.yaml", base, [broken, tasks[1]], "linear", output=out)
    assert _run(str(failing), "--overwrite") == 1
    assert snapshot(out) == previous
    # A successful overwrite replaces it completely.
    second = write_recipe(tmp_path / "ties.yaml", base, tasks, "ties", {"density": 0.5}, output=out)
    assert _run(str(second), "--overwrite") == 0
    assert _run(str(second), "--output", str(tmp_path / "fresh")) == 0
    assert snapshot(out) != previous
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "fresh" / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "fresh", "in", "linear.yaml", "merged", "ties.yaml"]


def test_overwrite_of_a_link_replaces_the_link_not_its_target(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "weights").write_text("kept")
    out = tmp_path / "merged"
    out.symlink_to(target, target_is_directory=True)
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "weights").write_text("new")
    assert not out.is_symlink() and (out / "weights").read_text() == "new"
    assert (target / "weights").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "merged"]


def test_a_signal_while_the_writer_thread_is_joined_is_raised_once_it_has_ended() -> None:
    """A handler raising inside Thread.join (Python < 3.12) would leave the thread's end half-recorded
    and let it print a traceback later; the signal waits until the join has returned."""
    written: list[str] = []

    class SlowShard:
        def write(self, name: str, tensor: torch.Tensor, row: int) -> None:
            time.sleep(0.5)
            written.append(name)

    main = threading.main_thread().ident
    assert main is not None
    with pytest.raises(Interrupted) as caught:
        with signals_as_exceptions():
            background = AsyncWriter()
            background.write(SlowShard(), ["w"], torch.zeros(1))  # type: ignore[arg-type]
            threading.Timer(0.1, signal.pthread_kill, (main, signal.SIGTERM)).start()
            background.drain()  # the signal lands in the main thread while it waits here
    assert written == ["w"] and not background._thread.is_alive()
    assert caught.value.signum == signal.SIGTERM and not caught.value.published


@pytest.fixture
def signal_as_a_thread_starts(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """SIGTERM to the main thread right after the next threads begin (inside ``Thread.start``);
    returns what reaches ``sys.unraisablehook`` (a thread failing as it starts ends up there)."""
    unraisable: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    real, main = threading._start_new_thread, threading.main_thread().ident  # type: ignore[attr-defined]

    def start_then_signal(*args: object) -> int:
        ident = real(*args)
        signal.pthread_kill(main, signal.SIGTERM)  # type: ignore[arg-type]
        return ident

    monkeypatch.setattr(threading, "_start_new_thread", start_then_signal)
    return unraisable


def test_a_signal_while_the_writer_thread_starts_leaves_no_thread_behind(signal_as_a_thread_starts: list[object]) -> None:
    with pytest.raises(Interrupted):
        with signals_as_exceptions():
            AsyncWriter()
    time.sleep(0.2)  # a thread unregistered by Thread.start would fail about now, as it registers itself
    assert signal_as_a_thread_starts == []
    assert not [t for t in threading.enumerate() if t.name == "neuromerge-writer"]


def test_a_signal_while_the_reader_thread_starts_stops_the_merge_cleanly(
        tmp_path: Path, signal_as_a_thread_starts: list[object]) -> None:
    base, tasks = toy_family(tmp_path / "in", 2)
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", base, tasks, "task_arithmetic"))
    with pytest.raises(Interrupted) as caught:
        run_merge(prepare(recipe), MergeOptions(tmp_path / "merged", "cpu"))
    time.sleep(0.2)
    assert signal_as_a_thread_starts == [] and not caught.value.published
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "recipe.yaml"]
