"""BatchNorm statistics over the global batch when several processes train (`trainer.sync_bn`).

Under DDP each process sees only its shard of a global batch, so a plain BatchNorm normalises with that shard's
mean and variance: N processes then compute another function than one process with the same global batch.
`synchronised_batchnorm` swaps every BatchNorm of the model for a `SyncBatchNorm` for the duration of a fit and
puts the original modules back afterwards, with the parameters and running statistics the swapped-in modules
trained, so checkpoints, surgery and Torch-Pruning keep seeing plain BatchNorm layers.

PyTorch's own `nn.SyncBatchNorm` (used on GPUs) refuses CPU modules; on CPU (gloo) the same statistics are
all-reduced here with differentiable collectives, so the multi-process path can be tested on any machine.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as distributed_functional
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm over every process's shard for CPU processes (gloo), where `nn.SyncBatchNorm` refuses to run: in
    training under a process group, the mean and (biased) variance are all-reduced with autograd, so gradients
    flow through the global statistics as they do in `nn.SyncBatchNorm`."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = torch.tensor([input.numel() / input.shape[1]], dtype=input.dtype)
        totals = distributed_functional.all_reduce(torch.cat([input.sum(dims), count]))
        samples = totals[-1]
        mean = totals[:-1] / samples
        centred = input - mean.view(shape)
        variance = distributed_functional.all_reduce(centred.pow(2).sum(dims)) / samples
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), variance.detach(), samples.item())
        output = centred * torch.rsqrt(variance + self.eps).view(shape)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        return output

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, variance: Tensor, samples: float) -> None:
        """As F.batch_norm does: exponential (or cumulative with momentum None) average, unbiased variance."""
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
        self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1 - factor).add_(variance * samples / max(samples - 1, 1), alpha=factor)


@contextmanager
def synchronised_batchnorm(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block, every BatchNorm below `model` (not the model itself) is a synchronised one sharing its
    parameters and buffers; afterwards the original modules are back, holding whatever the block trained."""
    originals: Dict[str, _BatchNorm] = {
        name: module for name, module in model.named_modules()
        if enabled and name and isinstance(module, _BatchNorm) and not isinstance(module, nn.SyncBatchNorm)}
    synced = {name: _synchronised(module) for name, module in originals.items()}
    _replace(model, synced)
    try:
        yield
    finally:
        for name, original in originals.items():
            original._parameters.update(synced[name]._parameters)
            original._buffers.update(synced[name]._buffers)
            original.train(synced[name].training)
        _replace(model, originals)


def _synchronised(module: _BatchNorm) -> _BatchNorm:
    """A synchronised BatchNorm over the very same parameter and buffer tensors: PyTorch's `nn.SyncBatchNorm` for
    a module on a GPU (built by `convert_sync_batchnorm`, which shares them), a `GlobalBatchNorm` on CPU."""
    if module.running_mean is not None and module.running_mean.device.type != "cpu" or \
            module.weight is not None and module.weight.device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    synced = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats)
    synced._parameters.update(module._parameters)
    synced._buffers.update(module._buffers)
    synced.train(module.training)
    return synced


def _replace(model: nn.Module, modules: Dict[str, nn.Module]) -> None:
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
