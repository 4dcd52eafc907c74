"""Model measurements: size and compute (latency lives in `pipeline.measure.latency`)."""

from __future__ import annotations

from typing import Dict, Tuple

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


def count_per_module(model: nn.Module, example_inputs: torch.Tensor) -> Dict[str, Tuple[int, int]]:
    """Module name -> (parameters, multiply-accumulates) of its own, from the same counter as `count_macs`, so
    that a layer's figures before and after removal add up to the totals' change."""
    was_training = model.training
    _, _, macs, parameters = tp.utils.count_ops_and_params(model, example_inputs, layer_wise=True)
    model.train(was_training)
    return {name: (int(parameters.get(module, 0)), int(macs.get(module, 0))) for name, module in model.named_modules()}
