"""torchrun support for extraction: ranks, local device, a barrier. No home-made scheduler.

Inference needs no collectives: each rank takes a contiguous block of the missing shards
(never DistributedSampler, which pads by repeating samples) and writes its own shard files.
Barriers only order the bookkeeping: rank 0 registers backbones before the others read them,
and builds the index after every rank has written its shards.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist


def env_rank_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


@contextmanager
def dist_context():
    """Join torchrun's process group when launched by it (gloo on CPU, nccl on GPUs)."""
    rank, world, local = env_rank_world()
    started = False
    if world > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        started = True
    try:
        yield rank, world
    finally:
        if started:
            dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
