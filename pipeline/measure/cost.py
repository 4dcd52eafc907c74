"""Model measurements: size and compute (latency lives in `pipeline.measure.latency`)."""

from __future__ import annotations

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
