"""Distributed set-up for runs launched by ``torchrun`` (DistributedDataParallel).

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them the run is a single process.
NCCL is used on GPUs, gloo on the CPU (which is how the distributed path is tested here).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: torch.device) -> DistInfo:
    """Join the process group when launched by torchrun; otherwise a no-op."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return info


def device_for(info_local_rank: int, requested: torch.device) -> torch.device:
    """Under torchrun each process takes the GPU of its local rank."""
    if requested.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.cuda.set_device(info_local_rank)
        return torch.device("cuda", info_local_rank)
    return requested


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def gather_objects(info: DistInfo, value):
    """Every rank's ``value``, as a list on every rank."""
    if not info.enabled:
        return [value]
    result = [None] * info.world_size
    dist.all_gather_object(result, value)
    return result


def broadcast_object(info: DistInfo, value):
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def average_gradients(info: DistInfo, module: torch.nn.Module) -> None:
    """Average ``module``'s gradients over the ranks (for parameters outside the DDP wrapper:
    the loss terms' own modules); a parameter without a gradient on a rank counts as zero."""
    if not info.enabled:
        return
    for parameter in module.parameters():
        if not parameter.requires_grad:
            continue
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad)
        parameter.grad /= info.world_size


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
