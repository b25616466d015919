"""PyTorch distributed (DDP) helpers. Launch with ``torchrun --nproc_per_node N``; no own process management.

Usage::

    ctx = init_distributed()          # reads RANK / WORLD_SIZE / LOCAL_RANK set by torchrun
    if ctx.is_main: write files
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed() -> DistContext:
    """Join the process group that torchrun describes in the environment (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = torch_dist.get_rank() if world > 1 else 0
    return DistContext(rank=rank, world=world, local_rank=local, device=device)


def shard(indices: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's share of an epoch's permutation, padded so every rank takes the same number of steps."""
    if ctx.world == 1:
        return indices
    n = -(-len(indices) // ctx.world) * ctx.world
    padded = torch.cat([indices, indices[: n - len(indices)]])
    return padded[ctx.rank::ctx.world]


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        torch_dist.barrier()


def cleanup(ctx: DistContext) -> None:
    if ctx.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
