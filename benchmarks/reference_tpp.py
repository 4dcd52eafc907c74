"""A reference-style TPP step, the baseline the pipeline's own step is measured against.

It reproduces the shape of the paper's reference code's per-step work, not its numbers' source: the Gram target is
rebuilt every step by a Python loop over the pruned indices, λ is a Python float, the L2/BatchNorm penalty masks
are rebuilt from index lists every step, and a log string reads the regularization loss with `.item()` every
step (a host–device synchronisation). Same formulas as `TPPRegularizer`, so both train the same model.
"""

from __future__ import annotations

from typing import List, Mapping, Optional, Tuple

import torch
from torch import nn

from pipeline.config import RegularizerConfig
from pipeline.pruning.regularizer import LambdaSchedule, TPPRegularizer
from pipeline.hooks import TrainingHooks


class ReferenceStyleTPP(TrainingHooks):
    """TPP written the way the reference code runs it: loops, floats and a synchronising log line per step."""

    def __init__(self, model: nn.Module, pruned: Mapping[str, torch.Tensor], example_inputs: torch.Tensor,
                 config: RegularizerConfig, step: int = 0) -> None:
        members = TPPRegularizer(model, pruned, example_inputs, config).penalized
        self.config = config
        self.schedule = LambdaSchedule.from_config(config)
        self.step = step
        self.layers: List[Tuple[nn.Parameter, List[int]]] = [
            (model.get_submodule(name).weight, indices.tolist()) for name, indices in pruned.items()]
        self.penalized: List[Tuple[nn.Parameter, List[int]]] = [
            (tensor.parameter, _rows_of(tensor.mask)) for tensor in members]
        self.last_regularization: Optional[torch.Tensor] = None
        self.log_line = ""

    def extra_loss(self) -> Optional[torch.Tensor]:
        lam = self.schedule(self.step)
        total = torch.zeros((), device=self.layers[0][0].device)
        for weight, pruned in self.layers:
            rows = weight.flatten(1)
            gram = rows @ rows.T
            target = gram.detach().clone()
            for index in pruned:
                target[index, :] = 0
                target[:, index] = 0
            total = total + nn.functional.mse_loss(gram, target)
        self.last_regularization = total
        return self.config.alpha * lam * total

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        lam = self.schedule(self.step)
        for parameter, rows in self.penalized:
            mask = torch.zeros(parameter.shape[0], device=parameter.device)
            mask[torch.tensor(rows, device=parameter.device)] = 1
            parameter.grad += lam * parameter * mask.view(-1, *([1] * (parameter.dim() - 1)))

    def after_optimizer_step(self) -> None:
        self.step += 1
        regularization = self.last_regularization.item() if self.last_regularization is not None else 0.0
        self.log_line = f"step {self.step} lambda {self.schedule(self.step):g} reg {regularization:.6f}"


def _rows_of(mask: torch.Tensor) -> List[int]:
    """The filter (row) indices a full-shaped 0/1 mask marks."""
    return torch.nonzero(mask.flatten(1).amax(dim=1) if mask.dim() > 1 else mask).flatten().tolist()
