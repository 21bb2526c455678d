"""Multi-process training with torchrun and DistributedDataParallel (NCCL on CUDA, gloo on the CPU).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Without them the run is a
single process and every function here is a no-op.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """This process's place in the run; ``owned`` is True when this module initialised the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owned: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def environment_ranks() -> tuple[int, int, int]:
    """Return (rank, world size, local rank) from torchrun's environment variables."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def start(device: torch.device) -> ProcessGroup:
    """Join the torchrun process group if WORLD_SIZE > 1 (NCCL for CUDA devices, else gloo)."""
    rank, world_size, local_rank = environment_ranks()
    if world_size <= 1:
        return ProcessGroup()
    if dist.is_initialized():
        return ProcessGroup(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    logger.info("Joined %s process group as rank %d of %d", backend, rank, world_size)
    return ProcessGroup(rank=rank, world_size=world_size, local_rank=local_rank, owned=True)


def stop(group: ProcessGroup) -> None:
    if group.owned and dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: torch.nn.Module, group: ProcessGroup, device: torch.device) -> torch.nn.Module:
    """Wrap ``module`` in DistributedDataParallel when the run has several processes."""
    if not group.enabled:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def no_sync(module: torch.nn.Module, skip_sync: bool):
    """Return DDP's no_sync() context for accumulation micro-steps that skip the gradient all-reduce."""
    if skip_sync and isinstance(module, DistributedDataParallel):
        return module.no_sync()
    return contextlib.nullcontext()


def mean_across_ranks(value: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Return the mean of a scalar tensor over all ranks (the value itself for one process)."""
    if not group.enabled:
        return value
    reduced = value.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / group.world_size


def barrier(group: ProcessGroup) -> None:
    if group.enabled:
        dist.barrier()
