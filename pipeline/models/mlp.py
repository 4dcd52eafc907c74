"""MLP-7-Linear, the TPP paper's trainability-study network.

A plain stack of nn.Linear layers with no BatchNorm, so pruning's damage to trainability (dynamical isometry) is
not masked by normalisation. With activation "linear" the whole network is a linear map, which makes its
input-output Jacobian exactly the product of the weight matrices that TPP's analysis is about.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from pipeline.models.registry import check_choice, check_positive, register_model


def _identity(x: torch.Tensor) -> torch.Tensor:
    """The "linear" activation: leave the pre-activation unchanged."""
    return x


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "linear": _identity,
    "relu": torch.relu,
    "tanh": torch.tanh,
}


class MLP(nn.Module):
    """Linear layers `layers.0`..`layers.{depth-1}` on the flattened input, activation between them."""

    def __init__(self, in_features: int, width: int, depth: int, num_classes: int, activation: str) -> None:
        super().__init__()
        sizes = [in_features] + [width] * (depth - 1) + [num_classes]
        self.layers = nn.ModuleList(nn.Linear(fan_in, fan_out) for fan_in, fan_out in zip(sizes, sizes[1:]))
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activate = ACTIVATIONS[self.activation]
        out = torch.flatten(x, 1)
        for layer in self.layers[:-1]:
            out = activate(layer(out))
        return self.layers[-1](out)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


@register_model("mlp7_linear")
def mlp7_linear(num_classes: int, in_channels: int = 3, image_size: int = 32, width: int = 100, depth: int = 7,
                activation: str = "linear") -> MLP:
    """The paper's MLP-7-Linear (7 layers of width 100, no nonlinearity); width/depth/activation for ablations."""
    check_positive("width", width)
    check_positive("depth", depth)
    check_choice("activation", activation, ACTIVATIONS)
    return MLP(in_channels * image_size**2, width, depth, num_classes, activation)
