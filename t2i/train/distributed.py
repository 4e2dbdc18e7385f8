"""Data-parallel training under `torchrun` (gloo on CPU), read from the environment it sets.

No launcher of our own: `torchrun --nproc_per_node N -m t2i.cli train ...` sets RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous address; without them we are one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes checkpoints, logs and images."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(group: bool = False) -> DistInfo:
    """Join the process group if torchrun started us, else return the single-process info.
    group: join it even as torchrun's only process (FSDP shards over a process group of any size);
    without torchrun that is an error."""
    if group and "WORLD_SIZE" not in os.environ:
        raise ValueError("--parallel fsdp runs under torchrun (torchrun --nproc_per_node N -m t2i.cli train ...)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not group:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    # Each process gets its share of the cores instead of all of them fighting over every core.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return info


def cleanup(info: DistInfo) -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """True on every rank if it is True on any rank (e.g. a stop signal that reached one process)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
