"""OrthP: exact re-orthogonalisation of a network's weights, the paper's "oracle" repair of trainability.

Every Conv2d/Linear weight W, flattened to 2-D (out × rest), is replaced by the orthonormal factor of its own QR
decomposition scaled by the activation gain g, so that W Wᵀ = g² I (out ≤ rest) or Wᵀ W = g² I (out > rest).
For a linear network (g = 1) this makes the input–output Jacobian, the product of the weights, an isometry on
the span it acts on: dynamical isometry, which pruning destroys.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.pruning.surgery import prunable_layers

DEFAULT_ACTIVATION = "relu"


def activation_gain(model: nn.Module) -> float:
    """The gain that keeps signal scale through the model's nonlinearity (torch's `calculate_gain`).

    A model that names its activation in an `activation` string attribute (the MLP: "linear", "relu", "tanh")
    gets that activation's gain, so MLP-7-Linear gets 1; every other model of the registry is a ReLU network
    and gets √2. Deriving it from the model keeps the gain right when the MLP's activation is changed.
    """
    activation = getattr(model, "activation", None)
    return nn.init.calculate_gain(activation if isinstance(activation, str) else DEFAULT_ACTIVATION)


def orthonormal_like(weight: torch.Tensor) -> torch.Tensor:
    """The orthonormal QR factor of `weight` (flattened to out × rest), in its shape and dtype.

    QR runs on the transpose when out < rest, so the rows come out orthonormal. Columns of Q are multiplied by
    sign(diag(R)), the unique QR with a positive diagonal of R, so each column keeps the orientation of the
    weight's own column instead of LAPACK's arbitrary sign (a zero on the diagonal of a rank-deficient weight
    counts as +1, so no row or column is zeroed).
    """
    rows = weight.detach().flatten(1).float()
    wide = rows.shape[0] < rows.shape[1]
    q, r = torch.linalg.qr(rows.T if wide else rows)
    q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
    return (q.T if wide else q).reshape(weight.shape).to(weight.dtype)


@torch.no_grad()
def orthogonalize_(model: nn.Module, gain: float) -> nn.Module:
    """OrthP in place: every Conv2d/Linear weight becomes `gain` × its orthonormal QR factor; biases stay."""
    for layer in prunable_layers(model).values():
        layer.weight.copy_(gain * orthonormal_like(layer.weight))
    return model
