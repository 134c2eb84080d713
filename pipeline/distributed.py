"""Process-group setup shared by the torchrun entry points (training, hidden-state dump)."""
from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist

from pipeline.processes import exit_when_orphaned


def setup(cpu_only: bool = False) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; joins the process group when the
    world has several ranks (nccl on GPU, gloo on CPU). On CPU each local rank takes its share
    of the cores. The rank exits when torchrun dies."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        exit_when_orphaned()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and not cpu_only:
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def teardown(world: int) -> None:
    """Leave the process group while the interpreter is whole. What was built on it (DDP's reducer,
    FSDP2's state, the modules' hook cycles) must be freed first: left to the last garbage
    collection at interpreter exit, it destroys gloo's work objects from a finalizing interpreter,
    and the rank can abort ("terminate called without an active exception") after its work is
    done, failing the run. Call it after the function that built the model has returned."""
    gc.collect()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()  # what the group's pending work still held (FSDP2's modules) is free only now
