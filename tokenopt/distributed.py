"""Process-group helpers so the same script runs alone or under ``torchrun --nproc_per_node N``.

torchrun sets WORLD_SIZE/RANK/LOCAL_RANK/MASTER_ADDR; when they say more than one process and no
process group exists yet, we create one: nccl when CUDA is there (one GPU per local rank), gloo on
CPU. Callers never need to call ``init_process_group`` themselves.

It sits below both ``tokenopt.data`` (loaders that shard per rank) and ``tokenopt.train`` (the
loop, evaluation), so the data side never imports the training side.
"""
from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


def init_if_launched() -> bool:
    """Join the process group torchrun prepared, if any; True when running distributed."""
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    # Left to interpreter teardown, gloo's worker threads can be destroyed while joinable and the
    # process aborts ("terminate called without an active exception", SIGABRT) after a run that
    # succeeded; the group we created is ours to destroy while Python is still alive.
    atexit.register(_destroy_group)
    return True


def _destroy_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def is_main() -> bool:
    return rank_and_world()[0] == 0


def default_device() -> torch.device:
    """This process's device: its local GPU under torchrun, the GPU if there is one, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_objects(obj) -> list:
    """``obj`` from every rank (a one-element list when not distributed)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def sum_across_ranks(values: list[float], device: torch.device) -> list[float]:
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
