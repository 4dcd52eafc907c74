"""The training step as a function of one batch, built once per phase in the mode `trainer.step` asks for.

`eager` runs `train_step` as written. The step is the unit that can be compiled or captured, because everything
that changes from step to step inside it lives in device tensors.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pipeline.runtime import Runtime

StepFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def build_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, hooks,
               runtime: Runtime) -> StepFunction:
    """A function (inputs, targets) → [loss·batch, correct] on the device that trains `model` one step."""
    from pipeline.training.loop import train_step

    def eager(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if runtime.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return train_step(model, inputs, targets, optimizer, scaler, hooks, runtime.device, runtime.amp)

    return eager
