"""torchrun / DistributedDataParallel plumbing: one process per GPU (or CPU process with gloo), rank 0 logs and saves.

`torchrun --nproc_per_node=K -m iouctl train ...` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; multi-node runs use
torchrun's rendezvous the same way. Without those variables everything here is a no-op.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as torch_dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init(device_type: str) -> None:
    """Join the process group torchrun describes (nccl on GPUs, gloo on CPU), once."""
    if world_size() > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


def device_for(device: torch.device) -> torch.device:
    """Under torchrun each process takes the GPU of its local rank."""
    if device.type == "cuda" and world_size() > 1:
        torch.cuda.set_device(local_rank())
        return torch.device("cuda", local_rank())
    return device


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    if world_size() <= 1:
        return model
    init(device.type)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def shutdown() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
