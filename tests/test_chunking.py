"""chunking: cache-sized chunks on a CPU, large ones on a GPU, and the blocks of rows that follow them."""

from __future__ import annotations

import pytest
import torch

from neuromerge_cli import engine
from neuromerge_cli.chunking import GPU_CHUNK, chunk_size

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)  # a device object needs no GPU


def test_a_cpu_keeps_its_chunks_and_a_gpu_takes_large_ones() -> None:
    assert chunk_size(1 << 16, CPU) == 1 << 16
    assert chunk_size(1 << 16, CUDA) == GPU_CHUNK
    assert chunk_size(GPU_CHUNK * 2, CUDA) == GPU_CHUNK * 2  # never smaller than the CPU's


def test_blocks_of_rows_follow_the_device_unless_the_setting_names_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NEUROMERGE_BLOCK_ELEMENTS", raising=False)
    assert engine.block_elements(CPU) == engine.BLOCK_ELEMENTS
    assert engine.block_elements(CUDA) == max(engine.BLOCK_ELEMENTS, GPU_CHUNK)
    monkeypatch.setenv("NEUROMERGE_BLOCK_ELEMENTS", "4096")
    assert engine.block_elements(CPU) == engine.block_elements(CUDA) == 4096
