"""Progress reporting: the engine's per-pass calls, plain lines, JSON events, warnings."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import pytest
from rich.console import Console

from helpers import GLOBAL_TIES_READS, toy_family, toy_tensors, write_recipe
from neuromerge_cli.engine import MergeOptions, prepare, run_merge
from neuromerge_cli.progress import JsonLog, QuietJsonLog, RichLog, RunLog, TextLog, make_log, warnings_to
from neuromerge_cli.recipe import load_recipe


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_engine_reports_every_pass_with_bytes(tmp_path: Path) -> None:
    num_tasks = 2
    base, tasks = toy_family(tmp_path, num_tasks)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", base, tasks, "ties", {"density": 0.5}))
    calls: list[tuple[str, int, int, int, int]] = []
    run_merge(prepare(recipe), MergeOptions(tmp_path / "out", "cpu", progress=lambda *a: calls.append(a)))

    toy = toy_tensors()
    floats = sum(t.numel() * t.element_size() for t in toy.values() if t.is_floating_point()) * (num_tasks + 1)
    everything = sum(t.numel() * t.element_size() for t in toy.values()) * (num_tasks + 1)
    n_float = sum(1 for t in toy.values() if t.is_floating_point())
    phases = list(dict.fromkeys(c[0] for c in calls))
    reads = GLOBAL_TIES_READS  # global TIES: the exact threshold, the majority sign; then the merge read
    assert phases == [*(f"statistics pass {g}/{reads}" for g in range(1, reads + 1)), "merge"]
    for phase in phases:
        seen = [c[1:] for c in calls if c[0] == phase]
        total, bytes_total = (len(toy), everything) if phase == "merge" else (n_float, floats)
        assert seen[0] == (0, total, 0, bytes_total)  # the pass is announced before any read
        assert seen[-1] == (total, total, bytes_total, bytes_total)
        assert [s[0] for s in seen] == list(range(total + 1))
        assert all(a[2] < b[2] for a, b in zip(seen, seen[1:]))  # bytes only grow


def _drive(log: RunLog, clock: FakeClock, sizes: list[int], step_s: float = 0.5, phase: str = "merge") -> None:
    total = sum(sizes)
    log.progress(phase, 0, len(sizes), 0, total)
    done = 0
    for i, size in enumerate(sizes):
        clock.now += step_s
        done += size
        log.progress(phase, i + 1, len(sizes), done, total)


def test_text_log_lines() -> None:
    stream, clock = io.StringIO(), FakeClock()
    log = TextLog(stream, clock)
    _drive(log, clock, [1024] * 20)  # 20 KiB in 10 s
    lines = stream.getvalue().splitlines()
    assert lines[0] == "merge: 20 tensors, 20 KiB to read"
    assert lines[-1] == "merge: done, 20 tensors, 20 KiB in 0:10 (2 KiB/s)"
    middle = lines[1:-1]
    assert len(middle) == 9  # about every 10 % of the bytes
    assert middle[0] == "merge: 2/20 tensors, 2 KiB of 20 KiB (10%), 2 KiB/s, ETA 0:09"
    assert middle[4] == "merge: 10/20 tensors, 10 KiB of 20 KiB (50%), 2 KiB/s, ETA 0:05"


def test_text_log_prints_slow_passes_every_30_seconds() -> None:
    stream, clock = io.StringIO(), FakeClock()
    log = TextLog(stream, clock)
    _drive(log, clock, [1] * 1000, step_s=1.0)  # 0.1 % per 1 s tensor: the 30 s rule, not the 10 % rule
    lines = stream.getvalue().splitlines()[1:-1]
    assert 30 <= len(lines) <= 40
    assert lines[0].startswith("merge: 30/1000 tensors")


def test_json_log_events() -> None:
    stream, clock = io.StringIO(), FakeClock()
    log = JsonLog(stream, clock, interval=1.0)
    _drive(log, clock, [100] * 10, step_s=0.4, phase="statistics pass 1/2")
    log.warning("something odd")
    log.summary({"method": "ties", "tensors": {"x": {}}, "totals": {"tensors": 1}}, "out")
    log.error("models[0]: missing", 1)
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "pass_start" and kinds[-4:] == ["pass_end", "warning", "summary", "error"]
    progress = [e for e in events if e["event"] == "progress"]
    # 10 tensors 0.4 s apart with at most one event per second
    assert [e["tensors_done"] for e in progress] == [3, 6, 9]  # at 1.2 s, 2.4 s, 3.6 s
    assert progress[0]["bytes_done"] == 300 and progress[0]["bytes_total"] == 1000
    assert progress[0]["elapsed_s"] == pytest.approx(1.2)
    assert progress[0]["bytes_per_s"] == pytest.approx(250.0)
    assert progress[0]["eta_s"] == pytest.approx(2.8)
    end = events[kinds.index("pass_end")]
    assert (end["phase"], end["tensors_done"], end["bytes_done"], end["elapsed_s"]) == ("statistics pass 1/2", 10, 1000, 4.0)
    summary = events[-2]
    assert summary["output"] == "out" and summary["method"] == "ties" and "tensors" not in summary
    assert events[-1]["message"] == "models[0]: missing" and events[-1]["exit_code"] == 1
    assert all(isinstance(e["time"], float) for e in events)


def test_quiet_json_log_keeps_only_errors() -> None:
    stream, clock = io.StringIO(), FakeClock()
    log = QuietJsonLog(stream, clock)
    _drive(log, clock, [1, 2, 3])
    log.warning("w")
    log.error("boom", 1)
    assert [json.loads(x)["event"] for x in stream.getvalue().splitlines()] == ["error"]


def test_make_log_picks_by_flags() -> None:
    terminal = Console(file=io.StringIO(), force_terminal=True)
    pipe = Console(file=io.StringIO(), force_terminal=False)
    assert type(make_log(False, False, terminal)) is RichLog
    assert type(make_log(False, False, pipe)) is TextLog
    assert type(make_log(True, False, terminal)) is RunLog
    assert type(make_log(False, True, terminal)) is JsonLog
    assert type(make_log(True, True, terminal)) is QuietJsonLog


def test_rich_log_draws_a_bar_per_pass() -> None:
    buffer = io.StringIO()
    log = RichLog(Console(file=buffer, force_terminal=True, width=140))
    clock = FakeClock()
    _drive(log, clock, [2048] * 4, phase="statistics pass 1/1")
    _drive(log, clock, [2048] * 5)
    log.close()
    text = buffer.getvalue()
    assert "statistics pass 1/1" in text and "merge" in text
    assert "4/4 tensors" in text and "5/5 tensors" in text
    assert "10.0/10.0 KiB" in text  # bytes of the merge pass, binary units


def test_warnings_go_to_the_log() -> None:
    stream = io.StringIO()
    log = JsonLog(stream)
    previous = warnings.showwarning
    with warnings_to(log), warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("careful", UserWarning, stacklevel=1)
    assert warnings.showwarning is previous
    events = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert [(e["event"], e["message"]) for e in events] == [("warning", "UserWarning: careful")]


def test_logs_take_calls_without_bytes_or_announcement() -> None:
    """A caller that only reports (phase, done, total) after each tensor still gets whole passes."""
    stream, clock = io.StringIO(), FakeClock()
    log = JsonLog(stream, clock, interval=0.0)
    for phase in ("statistics pass 1/1", "merge"):
        for done in range(1, 4):
            clock.now += 1
            log.progress(phase, done, 3)
    kinds = [(e["event"], e["phase"]) for e in map(json.loads, stream.getvalue().splitlines())]
    assert kinds == [("pass_start", "statistics pass 1/1"), ("progress", "statistics pass 1/1"),
                     ("progress", "statistics pass 1/1"), ("pass_end", "statistics pass 1/1"),
                     ("pass_start", "merge"), ("progress", "merge"), ("progress", "merge"), ("pass_end", "merge")]
    text = io.StringIO()
    plain = TextLog(text, clock)
    for done in range(1, 4):
        plain.progress("merge", done, 3)
    lines = text.getvalue().splitlines()
    assert lines[0] == "merge: 3 tensors, 0 B to read" and lines[-1].startswith("merge: done, 3 tensors")
