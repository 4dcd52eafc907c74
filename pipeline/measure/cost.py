"""Model measurements: size, compute, and latency on the evaluation device."""

from __future__ import annotations

import statistics
import time
from typing import Tuple

import torch
import torch_pruning as tp
from torch import nn


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def count_macs(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on `example_inputs` (Torch-Pruning's counter), mode preserved."""
    was_training = model.training
    macs, _ = tp.utils.count_ops_and_params(model, example_inputs)
    model.train(was_training)
    return int(macs)


@torch.no_grad()
def measure_latency(model: nn.Module, batch: torch.Tensor, repeats: int, warmup: int = 3) -> float:
    """Median seconds of one eval-mode forward pass of `batch`, synchronising CUDA around each timing."""
    was_training = model.training
    model.eval()
    timings = []
    for index in range(warmup + repeats):
        _synchronize(batch.device)
        started = time.perf_counter()
        model(batch)
        _synchronize(batch.device)
        if index >= warmup:
            timings.append(time.perf_counter() - started)
    model.train(was_training)
    return statistics.median(timings)


def latency_pair(dense: nn.Module, pruned: nn.Module, batch: torch.Tensor, repeats: int) -> Tuple[float, float]:
    """Dense and pruned latency measured interleaved, so machine load drifts affect both alike."""
    dense_times, pruned_times = [], []
    for _ in range(repeats):
        dense_times.append(measure_latency(dense, batch, repeats=1, warmup=1))
        pruned_times.append(measure_latency(pruned, batch, repeats=1, warmup=1))
    return statistics.median(dense_times), statistics.median(pruned_times)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
