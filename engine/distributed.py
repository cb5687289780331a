"""Several processes under ``torchrun``: the rank, the process group's start and end, a barrier.

The trainer and the compression pipeline both use these, so a pipeline that starts the group lets
the training stages reuse it, and whoever started a group ends it.
"""

from __future__ import annotations

import os


def rank() -> int:
    """This process's rank, -1 when not started by torchrun."""
    return int(os.environ.get("RANK", -1))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    """Rank 0, or the only process: the one that writes files and prints."""
    return rank() in (-1, 0)


def start(device: str = "") -> bool:
    """Start the process group (gloo on the CPU, nccl on GPUs) unless there is one; returns whether
    this call started it (and so must :func:`stop` it)."""
    if world_size() == 1:
        return False
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    cpu = device in ("", "cpu")
    if not cpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("gloo" if cpu else "nccl")
    return True


def stop() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()
