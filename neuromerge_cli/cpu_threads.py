"""Torch's CPU threads around bookkeeping made of many small operations."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

OPENMP = "OpenMP" in torch.__config__.parallel_info()  # torch's intra-op threads can be changed at any time


@contextlib.contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Torch's CPU operations run on one thread inside the block.

    For work made of dozens of small operations (NeuroMerging's per-row T×T work on (rows, T+1, T+1)
    tensors; the global majority sign's bookkeeping of its open coordinates) OpenMP's fork and join cost
    more than the split saves, and its workers spin between the operations, taking the cores from the
    reader, the writer and the kernels' threads: NeuroMerging at T = 8 on 2 cores spent a quarter of its
    CPU time spinning (merge read 8.1–10.7 → 6.7–8.1 s; the same bytes).
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or not OPENMP:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
