"""The process's memory: the allocator's reuse of freed blocks, and the peak resident set."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

MALLOC_REUSE_BYTES = 32 << 20  # glibc's largest mmap threshold


def reuse_freed_memory() -> None:
    """Let glibc recycle freed blocks up to 32 MiB instead of unmapping them.

    By default large tensors are mmapped and unmapped on every allocation, so each temporary of
    every block pays page faults that cost as much as the arithmetic; blocks of rows are bounded,
    so recycling them keeps the footprint bounded too.
    """
    import ctypes

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, MALLOC_REUSE_BYTES)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 4 * MALLOC_REUSE_BYTES)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def peak_rss_bytes() -> int:
    """This process's peak resident set size.

    Linux's VmHWM starts afresh at exec; ``ru_maxrss`` (the fallback elsewhere) is carried over from
    the parent across fork and exec, so a small merge started by a big process would report the
    parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
