"""torchrun / DistributedDataParallel plumbing: one process per GPU (or CPU process with gloo), rank 0 logs and saves.

`torchrun --nproc_per_node=K -m iouctl train ...` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; multi-node runs use
torchrun's rendezvous the same way. Without those variables everything here is a no-op; with them (even
--nproc_per_node=1) training runs in DistributedDataParallel. This module is the only
reader of those variables; torch is imported by the functions that need it, so the CLI asks for the rank cheaply.
"""
from __future__ import annotations

import datetime
import os
from typing import Any

# How long the other ranks wait at a barrier while rank 0 evaluates: a COCO evaluation inside training takes minutes
# to an hour, past nccl's own timeout (10 minutes), so they wait on a CPU (gloo) group of their own.
WAIT_TIMEOUT = datetime.timedelta(hours=3)
_wait_group: Any = None


def launched() -> bool:
    """Whether torchrun started this process: then training runs in DistributedDataParallel even as one process (a
    1-process torchrun exercises the same nccl/gloo path as K processes)."""
    return "WORLD_SIZE" in os.environ


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (0 without torchrun): rank 0 owns the run directory, the logger and evaluation."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init(device_type: str) -> None:
    """Join the process group torchrun describes (nccl on GPUs, gloo on CPU), once."""
    import torch.distributed as torch_dist

    global _wait_group
    if launched() and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        # new_group is collective: made here, while every rank is in step, not at the first barrier, where the
        # others would wait inside it (under the store's default timeout) for rank 0's whole first evaluation
        _wait_group = torch_dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)


def device_for(device: Any) -> Any:
    """Under torchrun each process takes the GPU of its local rank (device: a torch.device)."""
    import torch

    if device.type == "cuda" and launched():
        torch.cuda.set_device(local_rank())
        return torch.device("cuda", local_rank())
    return device


def wrap(model: Any, device: Any) -> Any:
    """`model` (an nn.Module on `device`) in DistributedDataParallel under torchrun, else itself."""
    import torch

    if not launched():
        return model
    init(device.type)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def barrier() -> None:
    """Every rank waits here until all have arrived (no-op without a process group), for up to WAIT_TIMEOUT: rank 0
    evaluates alone inside the training loop, and the others wait here rather than inside the next gradient
    all-reduce, under the default group's timeout (torch's default: 10 minutes with nccl)."""
    global _wait_group
    import torch.distributed as torch_dist

    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return
    torch_dist.barrier(group=_wait_group)  # the group init() made; None (a group made elsewhere): the default one


def shutdown() -> None:
    global _wait_group
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        _wait_group = None
        torch_dist.destroy_process_group()
