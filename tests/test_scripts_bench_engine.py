"""The engine benchmark's own measure of a command: wall time, CPU time and the command's peak RSS, with GNU time or
without it (the launcher the GPU machines' image needs)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench_engine  # noqa: E402

HOLD_300_MIB = "x = bytearray(300 << 20); x[::4096] = b'\\x01' * len(x[::4096])"  # touched: resident


@pytest.mark.parametrize("gnu_time", [True, False])
def test_a_commands_peak_rss_is_its_own(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, gnu_time: bool) -> None:
    if gnu_time and not bench_engine.GNU_TIME.exists():
        pytest.skip("no GNU time here")
    if not gnu_time:
        monkeypatch.setattr(bench_engine, "GNU_TIME", tmp_path / "no-time")
    ballast = bytearray(400 << 20)  # this process holds more than the command: it must not be what is reported
    ballast[::4096] = b"\x01" * len(ballast[::4096])
    wall, rss, cpu = bench_engine.timed([sys.executable, "-c", HOLD_300_MIB])
    assert wall > 0 and (300 << 20) < rss < (400 << 20)
    assert 0 < cpu < wall * (os.cpu_count() or 1)
    with pytest.raises(RuntimeError, match="failed"):
        bench_engine.timed([sys.executable, "-c", "raise SystemExit(3)"])
    del ballast
