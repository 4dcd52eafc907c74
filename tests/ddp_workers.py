"""Two gloo processes on this machine, started with torch.multiprocessing, for tests of DDP details that need no
stage: a worker runs one scenario and rank 0 saves what it returns. Kept apart from the test modules so that the
spawned processes import only this."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Callable, Dict

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline.data import TensorBatches
from pipeline.runtime import Runtime
from pipeline.training import distributed
from pipeline.training.loop import fit, sgd

CPU = torch.device("cpu")
SAMPLES, BATCH = 17, 6  # global batches of 6, 6 and 5: the last one split 3/2 between two processes


def batchnorm_network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def train(rank: int = 0, world_size: int = 1, sync_bn: bool = True) -> Dict[str, torch.Tensor]:
    """Three epochs of momentum SGD on 17 samples in global batches of 6; the trained weights and statistics."""
    model = batchnorm_network()
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(SAMPLES, 3, generator=generator)
    targets = (inputs[:, 0] > 0).long()
    train_batches = TensorBatches(inputs, targets, BATCH, shuffle=True, seed=2, rank=rank, world_size=world_size)
    test_batches = TensorBatches(inputs, targets, SAMPLES, shuffle=False)
    runtime = Runtime(CPU, rank=rank, world_size=world_size, sync_bn=sync_bn)
    fit(model, train_batches, test_batches, sgd(model, 0.1, 0.9, 0.0), runtime=runtime, epochs=3)
    assert all(type(module) is not nn.SyncBatchNorm and "Sync" not in type(module).__name__
               for module in model.modules()), "the plain BatchNorm is back after fit"
    return {key: value.clone() for key, value in model.state_dict().items()}


def dropout_masks(rank: int, world_size: int) -> Dict[str, Any]:
    """The initial weights and the first step's dropout mask of each rank (all gathered on every rank)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 64), nn.Dropout(0.5), nn.Linear(64, 2))
    initial = [value.clone() for value in model.state_dict().values()]
    masks = []
    model[1].register_forward_hook(lambda module, args, output: masks.append(output == 0))
    inputs = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    batches = TensorBatches(inputs, torch.zeros(8, dtype=torch.long), 8, shuffle=False, rank=rank,
                            world_size=world_size)
    runtime = Runtime(CPU, rank=rank, world_size=world_size)
    fit(model, batches, batches, sgd(model, 0.0, 0.0, 0.0), runtime=runtime, max_steps=1)
    return {"initial": distributed.all_gather(initial), "masks": distributed.all_gather(masks[0])}


def blind_workspace(rank: int, world_size: int, workspace: str) -> None:
    """Rank 1 works in another folder than rank 0, as a node without the shared filesystem would."""
    distributed.check_shared_workspace(Path(workspace) / f"rank{rank}")


SCENARIOS: Dict[str, Callable[..., Any]] = {"train": train, "dropout_masks": dropout_masks,
                                            "blind_workspace": blind_workspace}


def _worker(rank: int, world_size: int, port: int, output: str, scenario: str, options: Dict[str, Any]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = SCENARIOS[scenario](rank, world_size, **options)
        if rank == 0:
            torch.save(result, output)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_processes(scenario: str, folder: Path, world_size: int = 2, **options: Any) -> Any:
    """Run `scenario` on `world_size` gloo processes; what rank 0 returned."""
    output = folder / f"{scenario}.pt"
    mp.spawn(_worker, args=(world_size, free_port(), str(output), scenario, options), nprocs=world_size)
    return torch.load(output, weights_only=False)
