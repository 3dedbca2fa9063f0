"""torchrun support for extraction: ranks, local device, a barrier. No home-made scheduler.

Inference needs no collectives: each rank takes a contiguous block of the missing shards
(never DistributedSampler, which pads by repeating samples) and writes its own shard files.
Barriers only order the bookkeeping: rank 0 registers backbones before the others read them,
and builds the index after every rank has written its shards.

Failures never hang the survivors forever: torchrun's agent tears the group down when a rank
process dies, and every collective (and the rendezvous in ``init_process_group``) has a timeout,
``FEATSTACK_DIST_TIMEOUT`` seconds (default 3600: ranks get equal shares of the work, so the
last barrier waits for stragglers only, but a share of a large run can take long). A rank that
times out raises; re-running the same command resumes from the shards on disk.
"""
from __future__ import annotations

import datetime
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 3600.0


def env_rank_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def local_world_size() -> int:
    """Processes of this job on this machine (they share its cores): torchrun's LOCAL_WORLD_SIZE."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    except ValueError:
        return 1


def timeout() -> datetime.timedelta:
    """Timeout of the process group's collectives, from FEATSTACK_DIST_TIMEOUT (seconds)."""
    raw = os.environ.get("FEATSTACK_DIST_TIMEOUT", "")
    try:
        secs = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        secs = DEFAULT_TIMEOUT_S
    return datetime.timedelta(seconds=max(1.0, secs))


@contextmanager
def dist_context():
    """Join torchrun's process group when launched by it (gloo on CPU, nccl on GPUs)."""
    rank, world, local = env_rank_world()
    started = False
    if world > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timeout())
        started = True
    try:
        yield rank, world
    finally:
        if started:
            dist.destroy_process_group()


def all_sum(values: list[int]) -> list[int]:
    """Element-wise sum of integer counters over the ranks (identity outside a process group)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.int64, device=dev)
    dist.all_reduce(t)
    return [int(v) for v in t.cpu()]


def barrier() -> None:
    """Wait for every rank (no-op outside a process group); raises after the group's timeout.

    With gloo, ``monitored_barrier`` names the ranks that did not arrive; NCCL's barrier is
    bounded by the process group timeout (its watchdog aborts the communicator)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    if dist.get_backend() == "gloo":
        dist.monitored_barrier(timeout=timeout(), wait_all_ranks=True)
    else:
        dist.barrier()
