"""Several processes on one merge (torchrun / accelerate launch): who does what, and collectives.

A launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Every process plans the
same merge; the tensors are split across ranks, each rank reads, merges and writes its own share
into the shared output files, global statistics are summed across ranks, and rank 0 publishes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch

from .errors import MergeError

T = TypeVar("T")


@dataclass
class World:
    """This process's place among the processes of one merge (rank 0 of 1 when run alone)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def alone(self) -> bool:
        return self.size == 1

    def device(self, kind: str) -> torch.device:
        """The compute device of this rank: its local GPU under CUDA."""
        return torch.device("cuda", self.local_rank) if kind == "cuda" else torch.device("cpu")

    def all_reduce_(self, tensors: Sequence[torch.Tensor], maximum: bool = False) -> None:
        """Sum ``tensors`` (or take their ``maximum``) in place across ranks (through the GPU with NCCL)."""
        if self.alone:
            return
        import torch.distributed as dist

        op = dist.ReduceOp.MAX if maximum else dist.ReduceOp.SUM
        for t in tensors:
            if self.backend == "nccl" and t.device.type != "cuda":
                tmp = t.to(torch.device("cuda", self.local_rank))
                dist.all_reduce(tmp, op=op)
                t.copy_(tmp.cpu())
            else:
                dist.all_reduce(t, op=op)

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if self.alone:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (in rank order), None elsewhere."""
        if self.alone:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def all_gather(self, obj: Any) -> list[Any]:
        if self.alone:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if not self.alone:
            import torch.distributed as dist

            if self.backend == "nccl":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    def share(self, items: Sequence[T], cost: Sequence[int]) -> list[T]:
        """This rank's share of ``items``: contiguous runs of about equal total ``cost``.

        Contiguous runs keep each rank's writes together in the output files.
        """
        if self.alone:
            return list(items)
        total = sum(cost) or 1
        out, acc = [], 0
        for item, c in zip(items, cost):
            # the rank whose cost interval holds this item's midpoint
            owner = min(self.size - 1, int((acc + c / 2) * self.size // total))
            if owner == self.rank:
                out.append(item)
            acc += c
        return out


def world_from_env(device_kind: str) -> World:
    """The launcher's world, with the process group started (gloo on CPU, NCCL on CUDA)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch.distributed as dist

    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if not dist.is_available():
        raise MergeError("WORLD_SIZE > 1 but this PyTorch has no torch.distributed")
    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(local)
        try:
            dist.init_process_group(backend, rank=rank, world_size=size)
        except (RuntimeError, ValueError) as exc:
            raise MergeError(f"torch.distributed: cannot start the {backend} process group ({exc})") from None
    return World(dist.get_rank(), dist.get_world_size(), local, backend)


def shutdown(world: World) -> None:
    if not world.alone:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
