"""The ties of blocks elected with a guess of the model's majority sign, held until the merge read is over.

Global-trim TIES finds its majority sign in the merge read (stats.ModelMajorityStat): each block elects
its ties (Σ_t w_t x_t exactly 0 while some x_t is not) with a guess and keeps, at those coordinates, θ0
and the merged value under each possible sign (elect.DeferredMajority). They wait for the last block in
an unnamed temporary file, so that memory does not grow with the model (held in memory as many small
tensors among the blocks' large ones, 20 MB of them raised the peak RSS of a 0.47B merge by 150 MB); the
engine then mends the written blocks whose guess was wrong.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator, NamedTuple

import numpy as np
import torch

from .methods.elect import MAJORITIES, DeferredMajority


class Held(NamedTuple):
    """A block's ties in the file from ``offset``: ``count`` positions (int64), then θ0 and each candidate
    (float32, in the order of MAJORITIES)."""

    guess: float
    part: str
    offset: int
    count: int


class HeldTies:
    """(tensor, first row, DeferredMajority) of every block with a tie, in the order they were added."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._blocks: list[tuple[str, int, Held]] = []
        self._file: BinaryIO | None = None

    def add(self, name: str, row: int, deferred: DeferredMajority) -> None:
        assert deferred.positions is not None and deferred.base_values is not None
        if self._file is None:  # unnamed: gone when closed, never published with the output
            self._file = tempfile.TemporaryFile(dir=self.folder, prefix=".held-ties-")
        offset = self._file.seek(0, 2)
        arrays = [deferred.positions.to(torch.int64), deferred.base_values.float(),
                  *(deferred.candidates[m].float() for m in MAJORITIES)]
        for a in arrays:
            self._file.write(a.cpu().contiguous().numpy().tobytes())
        self._blocks.append((name, row, Held(deferred.guess, deferred.part, offset, deferred.positions.numel())))

    def __len__(self) -> int:
        return len(self._blocks)

    def by_tensor(self) -> Iterator[tuple[str, list[tuple[int, DeferredMajority]]]]:
        """Each tensor's blocks (first row, election), read back one tensor at a time."""
        groups: dict[str, list[tuple[int, Held]]] = {}
        for name, row, held in self._blocks:
            groups.setdefault(name, []).append((row, held))
        for name, blocks in groups.items():
            yield name, [(row, self._load(held)) for row, held in blocks]

    def _load(self, held: Held) -> DeferredMajority:
        assert self._file is not None
        self._file.seek(held.offset)
        positions = torch.from_numpy(np.frombuffer(self._file.read(8 * held.count), dtype=np.int64).copy())
        values = [torch.from_numpy(np.frombuffer(self._file.read(4 * held.count), dtype=np.float32).copy())
                  for _ in range(1 + len(MAJORITIES))]
        deferred = DeferredMajority(lambda _: None, held.guess, None, held.part)
        deferred.keep(positions, values[0], dict(zip(MAJORITIES, values[1:])))
        return deferred

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._blocks = []
