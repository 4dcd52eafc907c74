"""The trainability measure of the TPP paper: mean singular value of the input–output Jacobian (mean JSV).

Per sample, the Jacobian of the logits w.r.t. the input is a classes × input-dim matrix; dynamical isometry
means its singular values are near 1, and pruning that hurts trainability shrinks them by orders of magnitude.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap


def input_jacobians(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Per-sample Jacobians of the logits w.r.t. the input, [samples, classes, input-dim], in eval mode.

    One vmap over samples of jacrev (reverse mode: one backward per class, far fewer than input dimensions)
    on a functional call of the model, so there is no Python loop per sample or class. Eval mode makes
    BatchNorm use its running statistics, which makes each sample's output depend on that sample alone.
    The model's train/eval mode is restored.
    """
    state = {name: tensor.detach() for name, tensor in (*model.named_parameters(), *model.named_buffers())}

    def logits(sample: torch.Tensor) -> torch.Tensor:
        return functional_call(model, state, (sample.unsqueeze(0),)).squeeze(0)

    was_training = model.training
    model.eval()
    try:
        jacobians = vmap(jacrev(logits))(inputs)
    finally:
        model.train(was_training)
    return jacobians.flatten(2)


def mean_jacobian_singular_value(model: nn.Module, inputs: torch.Tensor, *,
                                 max_samples: Optional[int] = None) -> float:
    """Mean singular value of the per-sample input–output Jacobian, averaged over the (first `max_samples`)
    samples of `inputs`, which must be on the model's device."""
    samples = inputs if max_samples is None else inputs[:max_samples]
    return torch.linalg.svdvals(input_jacobians(model, samples).float()).mean().item()
