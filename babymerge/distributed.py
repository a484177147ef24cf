"""Distributed set-up, kept out of the model and the loop: ``torchrun`` sets RANK/WORLD_SIZE and
we join the process group (NCCL on GPU, gloo on CPU); a plain run is a world of one."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from babymerge.config import InputError

T = TypeVar("T")


# How long a rank may wait in a collective. On a first run rank 0 of each node tokenises the
# whole corpus (BabyLM's 50M words of text and 50M of captions: minutes, ~4 per 100M words
# measured on a slow 2-core machine) while the other ranks wait at a barrier; NCCL's default of
# 10 minutes would kill them mid-wait on a slower disk or CPU.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)


@dataclass
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str) -> torch.device:
    """``--device``: auto (CUDA when available), cpu, cuda (this process's ``LOCAL_RANK`` GPU under
    torchrun, GPU 0 otherwise) or cuda:N (refused where torchrun starts several processes on the
    node: each would take that one GPU). A GPU index past the visible ones is an error naming
    them."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise InputError(f"--device {name}: not a device (auto, cpu, cuda, cuda:N)") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: no CUDA device is available")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if device.index is None:
            device = torch.device("cuda", local_rank)
        elif local_world > 1:
            # every process on the node would take this one GPU: NCCL then fails at the first
            # collective ("Duplicate GPU detected"), or all ranks share its memory
            raise InputError(f"--device {name}: torchrun started {local_world} processes on this "
                             "node and each would use this one GPU; use --device cuda (or auto): "
                             "each process takes the GPU of its LOCAL_RANK")
        if device.index >= torch.cuda.device_count():
            raise InputError(
                f"--device {name}: GPU {device.index} does not exist here "
                f"({torch.cuda.device_count()} visible, CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
                + (f"; torchrun's LOCAL_RANK is {local_rank}: start at most one process per GPU"
                   if name in ("auto", "cuda") else ""))
    return device


def setup(device: str = "auto") -> World:
    """Join the process group if launched by torchrun; pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def from_main(world: World, make: Callable[[], T]) -> T:
    """``make()`` run on rank 0 only and its result handed to every rank (objects of our own
    making between our own processes; nothing read from a file is unpickled)."""
    if not world.distributed:
        return make()
    box = [make() if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(value: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= world.world_size
    return value


def teardown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
