"""How a run reports itself: a live display on a terminal, plain lines in a log, JSON events for CI.

Every log takes the engine's progress calls (engine.Progress: phase, tensors done/total, bytes
done/total; done = 0 announces a pass; a caller without bytes or announcements still works) plus a few events of the run (plan, push, warnings, the
final summary, errors). ``make_log`` picks one from the command-line flags.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import warnings
from typing import Any, Callable, Iterator, TextIO

from .units import format_bytes, format_duration
from .signals import deferred_signals

Clock = Callable[[], float]
SUMMARY_KEYS = ("method", "parameters", "device", "global", "tasks", "totals", "timings", "peak_memory")


class PassTimer:
    """Throughput and ETA of one pass, from the bytes read so far."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.start = clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def rate(self, bytes_done: int) -> float:
        """Bytes per second so far (0 before any time has passed)."""
        elapsed = self.elapsed()
        return bytes_done / elapsed if elapsed > 0 else 0.0

    def eta(self, bytes_done: int, bytes_total: int) -> float | None:
        """Seconds left at the current rate; None while the rate is unknown."""
        rate = self.rate(bytes_done)
        return (bytes_total - bytes_done) / rate if rate > 0 else None


class RunLog:
    """Shows nothing: the --quiet log. Errors are the caller's to print (see TextLog.error)."""

    def progress(self, phase: str, done: int, total: int, bytes_done: int = 0, bytes_total: int = 0) -> None:
        pass

    def event(self, kind: str, message: str, **fields: Any) -> None:
        """A step of the run worth a line (the plan, a push); ``fields`` are for machines."""

    def warning(self, message: str) -> None:
        pass

    def summary(self, report: dict[str, Any], output: str) -> None:
        """The finished merge (the human summary goes to stdout, from the CLI)."""

    def error(self, message: str, exit_code: int) -> None:
        print(f"error: {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class TextLog(RunLog):
    """Plain lines on a stream: one when a pass starts, about every 10 % of its bytes (or 30 s), one at its end."""

    STEP = 0.1
    EVERY_S = 30.0

    def __init__(self, stream: TextIO | None = None, clock: Clock = time.monotonic) -> None:
        self.stream = stream
        self.clock = clock
        self._timer: PassTimer | None = None
        self._phase: str | None = None
        self._next = 0.0
        self._last = 0.0

    def _print(self, line: str) -> None:
        print(line, file=self.stream or sys.stderr, flush=True)

    def progress(self, phase: str, done: int, total: int, bytes_done: int = 0, bytes_total: int = 0) -> None:
        if done == 0 or phase != self._phase:  # a pass starts (announced with done = 0, or first seen now)
            self._timer, self._phase = PassTimer(self.clock), phase
            self._next, self._last = self.STEP, self.clock()
            self._print(f"{phase}: {total} tensors, {format_bytes(bytes_total)} to read")
            if done == 0:
                return
        timer = self._timer or PassTimer(self.clock)
        if done == total:
            self._print(f"{phase}: done, {total} tensors, {format_bytes(bytes_done)} in "
                        f"{format_duration(timer.elapsed())} ({format_bytes(timer.rate(bytes_done))}/s)")
            return
        share = bytes_done / bytes_total if bytes_total else done / total
        if share >= self._next or self.clock() - self._last >= self.EVERY_S:
            self._next = (int(share / self.STEP) + 1) * self.STEP
            self._last = self.clock()
            eta = timer.eta(bytes_done, bytes_total)
            self._print(f"{phase}: {done}/{total} tensors, {format_bytes(bytes_done)} of {format_bytes(bytes_total)} "
                        f"({share:.0%}), {format_bytes(timer.rate(bytes_done))}/s, "
                        f"ETA {format_duration(eta) if eta is not None else '?'}")

    SHOWN_EVENTS = ("push",)  # the others' results go to stdout from the CLI

    def event(self, kind: str, message: str, **fields: Any) -> None:
        if kind in self.SHOWN_EVENTS:
            self._print(message)

    def warning(self, message: str) -> None:
        self._print(f"warning: {message}")


class RichLog(TextLog):
    """A live rich progress bar per pass: tensors, bytes, throughput, ETA (stderr is a terminal)."""

    def __init__(self, console: Any) -> None:
        super().__init__()
        self.console = console
        self._bar: Any = None
        self._task: Any = None

    def _print(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def progress(self, phase: str, done: int, total: int, bytes_done: int = 0, bytes_total: int = 0) -> None:
        from rich.progress import (
            BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
        )

        if self._bar is None:
            speed = TextColumn("{task.fields[speed]}", style="progress.data.speed")
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.fields[tensors]} tensors"), DownloadColumn(binary_units=True),
                                 speed, TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 console=self.console)
            with deferred_signals():  # its refresh thread is started whole
                self._bar.start()
        tensors = f"{done}/{total}"
        if done == 0 or phase != self._phase:
            self._phase = phase
            self._task = self._bar.add_task(phase, total=bytes_total or total or 1, tensors=tensors, speed="")
        task = self._bar.tasks[-1]
        rate = task.finished_speed or task.speed
        self._bar.update(self._task, completed=bytes_done if bytes_total else done, tensors=tensors,
                         speed=f"{format_bytes(rate)}/s" if rate and bytes_total else "")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


class JsonLog(RunLog):
    """One JSON object per line and event on a stream (stderr): for CI logs.

    Events: plan, pass_start, progress (at most every ``interval`` seconds per pass), pass_end,
    warning, push, pushed, summary, error. Every object has ``event`` and ``time`` (Unix seconds).
    """

    def __init__(self, stream: TextIO | None = None, clock: Clock = time.monotonic, interval: float = 1.0) -> None:
        self.stream = stream
        self.clock = clock
        self.interval = interval
        self._timer: PassTimer | None = None
        self._phase: str | None = None
        self._last = 0.0

    def emit(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, "time": round(time.time(), 3), **fields}, default=str)
        print(line, file=self.stream or sys.stderr, flush=True)

    def progress(self, phase: str, done: int, total: int, bytes_done: int = 0, bytes_total: int = 0) -> None:
        counts = {"phase": phase, "tensors_done": done, "tensors_total": total,
                  "bytes_done": bytes_done, "bytes_total": bytes_total}
        if done == 0 or phase != self._phase:
            self._timer, self._last, self._phase = PassTimer(self.clock), self.clock(), phase
            self.emit("pass_start", **{**counts, "tensors_done": 0, "bytes_done": 0})
            if done == 0:
                return
        timer = self._timer or PassTimer(self.clock)
        if done == total:
            self.emit("pass_end", **counts, elapsed_s=round(timer.elapsed(), 3),
                      bytes_per_s=round(timer.rate(bytes_done), 1))
        elif self.clock() - self._last >= self.interval:
            self._last = self.clock()
            eta = timer.eta(bytes_done, bytes_total)
            self.emit("progress", **counts, elapsed_s=round(timer.elapsed(), 3),
                      bytes_per_s=round(timer.rate(bytes_done), 1), eta_s=None if eta is None else round(eta, 1))

    def event(self, kind: str, message: str, **fields: Any) -> None:
        self.emit(kind, message=message, **fields)

    def warning(self, message: str) -> None:
        self.emit("warning", message=message)

    def summary(self, report: dict[str, Any], output: str) -> None:
        self.emit("summary", output=output, **{k: report[k] for k in SUMMARY_KEYS if k in report})

    def error(self, message: str, exit_code: int) -> None:
        self.emit("error", message=message, exit_code=exit_code)


class QuietJsonLog(JsonLog):
    """--json-log with --quiet: error events only."""

    def emit(self, event: str, **fields: Any) -> None:
        if event == "error":
            super().emit(event, **fields)


def make_log(quiet: bool, json_log: bool, console: Any) -> RunLog:
    """The log for these flags: JSON events, nothing, a live display on a terminal, or plain lines."""
    if json_log:
        return QuietJsonLog() if quiet else JsonLog()
    if quiet:
        return RunLog()
    return RichLog(console) if console.is_terminal else TextLog()


@contextlib.contextmanager
def warnings_to(log: RunLog) -> Iterator[None]:
    """Route Python warnings raised during a run to the log (so JSON logs stay JSON)."""

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, *_: Any) -> None:
        log.warning(f"{category.__name__}: {message}")

    previous = warnings.showwarning
    warnings.showwarning = show  # type: ignore[assignment]
    try:
        yield
    finally:
        warnings.showwarning = previous
