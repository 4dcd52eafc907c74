"""Multi-process training with PyTorch's own tools: torchrun to launch, DistributedDataParallel to train.

A stage asked for `trainer.devices: N > 1` relaunches itself under `python -m torch.distributed.run` (torchrun)
with N processes, so the same `dvc repro` command trains on N GPUs (or N CPU processes with the gloo backend).
Every process builds the same model, selects the same filters from the same dense weights and applies TPP's
penalties after the gradient all-reduce, so all ranks stay identical; only rank 0 writes files and tracks.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.errors import ConfigError

WORLD_SIZE_VARIABLE = "WORLD_SIZE"
PR_SET_PDEATHSIG = 1


def under_launcher() -> bool:
    """True inside a process started by torchrun (it sets the rank variables)."""
    return "LOCAL_RANK" in os.environ and WORLD_SIZE_VARIABLE in os.environ


def launch(devices: int, script: str, arguments: Sequence[str]) -> int:
    """Run `script` under torchrun with `devices` processes on this machine; return its exit status."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
               script, *arguments]
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(command, env=environment, check=False, preexec_fn=die_with_parent).returncode


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies.

    torchrun starts its workers in sessions of their own, so a `kill -9` of the stage (or of DVC) would leave them
    training as orphans that race the next run for the resume file and the outputs. With this on torchrun and on
    every worker, killing the stage kills the whole tree. A no-op off Linux.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def check_devices(devices: int, device: torch.device) -> None:
    """Refuse more processes than GPUs before anything starts (on CPU, processes share the cores)."""
    if device.type == "cuda" and devices > torch.cuda.device_count():
        raise ConfigError(f"params.yaml: 'trainer.devices' is {devices} but this machine has "
                          f"{torch.cuda.device_count()} CUDA GPU(s). Set trainer.devices to at most "
                          f"{torch.cuda.device_count()}.")


def start_process_group(device: torch.device) -> Tuple[int, int, torch.device]:
    """Join the torchrun process group: NCCL on CUDA (one GPU per local rank), gloo on CPU.

    Returns (rank, world size, this process's device); outside torchrun, (0, 1, device) and nothing starts.
    """
    if not under_launcher() or int(os.environ[WORLD_SIZE_VARIABLE]) < 2:
        return 0, 1, device
    die_with_parent()
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def stop_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """The module the step runs forward/backward through: DDP over `model` when several processes train."""
    if world_size < 2:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over all processes (the tensor itself when one process trains)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def local_batch_size(global_batch: int, world_size: int, key: Optional[str] = None) -> int:
    """Each process's share of the global batch; the global batch must split evenly so that DDP's gradient
    average equals the single-process gradient."""
    if global_batch % world_size:
        raise ConfigError(f"params.yaml: '{key or 'batch_size'}' is {global_batch}, which does not split evenly "
                          f"over trainer.devices={world_size} processes. Use a multiple of {world_size}.")
    return global_batch // world_size
