"""The peak resident set is this process's own, not inherited from the parent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import neuromerge_cli
from neuromerge_cli.memory import peak_rss_bytes


def _current_rss() -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_the_peak_is_at_least_the_memory_in_use() -> None:
    block = bytearray(64 << 20)  # zero-filled: every page is touched
    assert peak_rss_bytes() >= _current_rss() >= 64 << 20
    del block


def test_a_child_does_not_report_its_parents_peak() -> None:
    big = bytearray(256 << 20)  # the parent's peak now exceeds 256 MiB (ru_maxrss would pass it on)
    root = str(Path(neuromerge_cli.__file__).resolve().parent.parent)
    code = "import sys; sys.path.insert(0, sys.argv[1]); from neuromerge_cli.memory import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True, check=True).stdout)
    del big
    assert child < 128 << 20  # a bare interpreter, not the parent's 256+ MiB
