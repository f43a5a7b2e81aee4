"""How many entries one torch operation takes at a time, by device.

On a CPU, chunks that stay in the cache are fastest (each module sizes its own). On a GPU every operation is a
kernel launch with microseconds of fixed cost and memory is plentiful: there the chunks, and the blocks of
rows the engine streams, are GPU_CHUNK entries (per task) at least, so a merge makes a few launches per block
rather than a few per cache-sized chunk.
"""

from __future__ import annotations

import torch

GPU_CHUNK = 1 << 23  # entries per task: blocks of 8M (bfloat16 inputs of T = 8: 150 MB per block, pinned)


def chunk_size(cpu_size: int, device: torch.device) -> int:
    """``cpu_size`` on a CPU; on any other device at least GPU_CHUNK."""
    return cpu_size if device.type == "cpu" else max(cpu_size, GPU_CHUNK)
