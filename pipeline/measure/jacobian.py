"""The trainability measure of the TPP paper: mean singular value of the input–output Jacobian (mean JSV).

Per sample, the Jacobian of the logits w.r.t. the input is a classes × input-dim matrix; dynamical isometry
means its singular values are near 1, and pruning that hurts trainability shrinks them by orders of magnitude.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from pipeline.hooks import TrainingHooks

SAMPLES_PER_CHUNK = 32


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


def mean_jacobian_singular_value(model: nn.Module, inputs: torch.Tensor, *, max_samples: Optional[int] = None,
                                 samples_per_chunk: int = SAMPLES_PER_CHUNK) -> float:
    """Mean singular value of the per-sample input–output Jacobian, averaged over the (first `max_samples`)
    samples of `inputs`, which must be on the model's device.

    Samples go through in chunks so memory stays that of a `samples_per_chunk` × classes backward pass however
    many samples are averaged; the sum stays on the device and is read once.
    """
    samples = inputs if max_samples is None else inputs[:max_samples]
    total, count = torch.zeros((), device=samples.device), 0
    for chunk in samples.split(samples_per_chunk):
        values = torch.linalg.svdvals(input_jacobians(model, chunk).float())
        total += values.sum()
        count += values.numel()
    return (total / max(count, 1)).item()


def first_inputs(batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], count: int,
                 device: torch.device) -> torch.Tensor:
    """The first `count` inputs of (ordered) test batches: a fixed probe set, the same for every model compared."""
    collected, have = [], 0
    for inputs, _ in batches:
        collected.append(inputs[:count - have])
        have += len(collected[-1])
        if have >= count:
            break
    return torch.cat(collected).to(device)


class JacobianProbe(TrainingHooks):
    """Measures the mean JSV on fixed inputs at the end of every epoch, to follow trainability while training."""

    def __init__(self, inputs: torch.Tensor) -> None:
        self.inputs = inputs

    def epoch_metrics(self, model: nn.Module) -> Dict[str, float]:
        return {"mean_jsv": mean_jacobian_singular_value(model, self.inputs)}
