"""The peak resident set is this process's own, not inherited from the parent; heap holes go back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import neuromerge_cli
from neuromerge_cli import memory
from neuromerge_cli.memory import HeapGuard, peak_rss_bytes, rss_bytes


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


def test_rss_is_the_memory_in_use_now() -> None:
    assert rss_bytes() == pytest.approx(_current_rss(), abs=16 << 20)


def test_the_guard_trims_only_when_the_resident_set_grew_by_the_slack(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000]
    trims: list[int] = []
    monkeypatch.setattr(memory, "rss_bytes", lambda: now[0])
    monkeypatch.setattr(memory, "release_free_memory", lambda: (trims.append(now[0]), now.__setitem__(0, now[0] - 50)))
    guard = HeapGuard(slack=100, every=0)
    guard.check()  # the first check sets the floor, after a trim: 950
    for rss, expect in [(1000, 1), (1050, 1), (1051, 2), (1100, 2), (1102, 3)]:
        now[0] = rss
        guard.check()
        assert len(trims) == expect, rss
    assert trims == [1000, 1051, 1102]


def test_the_guard_looks_at_the_resident_set_once_every_so_many_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    looks: list[int] = []
    monkeypatch.setattr(memory, "rss_bytes", lambda: looks.append(1) or 0)
    monkeypatch.setattr(memory, "release_free_memory", lambda: None)
    guard = HeapGuard(slack=100, every=10)
    for nbytes in [4, 4, 4, 4, 4, 4, 4, 30, 1]:  # looks at the first call, then after 12, 12 and 30 bytes
        guard.check(nbytes)
    assert len(looks) == 2 + 3  # the first look trims, then looks again for the new floor


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_the_guard_hands_heap_holes_back() -> None:
    blocks = [bytearray(100 << 10) for _ in range(2000)]  # below the mmap threshold: in the heap
    kept = blocks[-1]  # pins the top of the heap, so free() alone cannot shrink it
    del blocks
    before = rss_bytes()
    HeapGuard(slack=0).check()
    assert before - rss_bytes() > 100 << 20
    del kept
