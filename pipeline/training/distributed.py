"""Multi-process training with PyTorch's own tools: torchrun to launch, DistributedDataParallel to train.

A training stage asked for `trainer.devices: N > 1` (or `trainer.nodes` > 1) relaunches itself under
`python -m torch.distributed.run` (torchrun, see `pipeline.training.launcher`), so the same `dvc repro` command
trains on N GPUs (or N CPU processes with the gloo backend). Every process builds the same model, selects the same
filters from the same dense weights and applies TPP's penalties after the gradient all-reduce, so all ranks stay
identical; only rank 0 writes files and tracks. Random draws inside the step (dropout, stochastic depth) differ
per rank, as they would between the samples of one process's batch.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.errors import ConfigError
from pipeline.runtime import seed_everything
from pipeline.training.launcher import die_with_parent

WORLD_SIZE_VARIABLE = "WORLD_SIZE"
WORKSPACE_PROBE = ".workspace-probe-{}"
T = TypeVar("T")


def under_launcher() -> bool:
    """True inside a process started by torchrun (it sets the rank variables)."""
    return "LOCAL_RANK" in os.environ and WORLD_SIZE_VARIABLE in os.environ


def check_devices(devices: int, device: torch.device) -> None:
    """Refuse more processes than GPUs before anything starts (on CPU, processes share the cores); `devices` is
    per node."""
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
    """The module the step runs forward/backward through: DDP over `model` when several processes train.

    DDP averages the processes' gradients, each of its own shard's mean loss: the gradient of the global batch's
    mean loss only when every shard has the same size. The gradient flowing back into a process's output is
    therefore scaled by n·world/b (n of the global batch's b samples are its own), exactly 1 for equal shards;
    scaling there, not the averaged gradients, keeps it right through synchronised BatchNorm's cross-process terms.
    """
    if world_size < 2:
        return model
    parallel = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    parallel.register_forward_hook(_weight_by_share)
    return parallel


def _weight_by_share(_module: nn.Module, args: Tuple[Any, ...], output: Any) -> None:
    if not (isinstance(output, torch.Tensor) and output.requires_grad):
        return
    count = torch.tensor([float(len(args[0]))], device=output.device)
    total = count.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    weight = count * dist.get_world_size() / total
    output.register_hook(lambda gradient: gradient * weight.to(gradient.dtype))


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over all processes (the tensor itself when one process trains)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather(value: Any) -> List[Any]:
    """Every process's `value` (picklable), indexed by rank; `[value]` when one process trains."""
    if not dist.is_initialized():
        return [value]
    values: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def on_main(compute: Callable[[], T]) -> T:
    """`compute()` run by the main process only, its result given to every process (work such as hashing a large
    data folder is then done once, not once per process)."""
    if not dist.is_initialized():
        return compute()
    value = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(value)
    return value[0]


def seed_per_rank(rank: int, world_size: int) -> None:
    """Give each process its own RNG stream, drawn from the shared one, once the model is built and wrapped (the
    initial weights are identical on every rank): per-sample dropout or stochastic-depth masks must not repeat
    across the ranks' shards. One process keeps its stream untouched."""
    if world_size < 2:
        return
    shared = int(torch.randint(2**62, (1,)).item())
    seed_everything(int(np.random.SeedSequence([shared, rank]).generate_state(1, dtype=np.uint64)[0]))


def check_shared_workspace(folder: Path) -> None:
    """Every process must see the same workspace (data, resume files, outputs): rank 0 writes a fresh nonce into
    `folder`, and each process, possibly on another node, must read it back."""
    if not dist.is_initialized():
        return
    nonce = [secrets.token_hex(8) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(nonce)
    probe = Path(folder) / WORKSPACE_PROBE.format(nonce[0])
    if dist.get_rank() == 0:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(nonce[0])
    dist.barrier()
    seen = probe.is_file() and probe.read_text() == nonce[0]
    views = all_gather((seen, socket.gethostname(), os.getcwd()))
    if dist.get_rank() == 0:
        probe.unlink(missing_ok=True)
    blind = sorted({f"{host}:{cwd}" for ok, host, cwd in views if not ok})
    if blind:
        raise ConfigError(f"The training processes do not share one workspace: rank 0 ({views[0][1]}) wrote "
                          f"{probe} but {', '.join(blind)} cannot read it. Every node must run in the same "
                          f"repository folder on a shared filesystem (data, resume files and outputs live there); "
                          f"start the job from such a folder.")


def local_batch_size(global_batch: int, world_size: int, key: Optional[str] = None) -> int:
    """Each process's share of the global batch; the global batch must split evenly so that DDP's gradient
    average equals the single-process gradient."""
    if global_batch % world_size:
        raise ConfigError(f"params.yaml: '{key or 'batch_size'}' is {global_batch}, which does not split evenly "
                          f"over {world_size} processes (trainer.devices × trainer.nodes). Use a multiple of "
                          f"{world_size}.")
    return global_batch // world_size
