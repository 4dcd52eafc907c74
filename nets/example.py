"""An example of your own model for `model.factory: nets.example.small_cnn` (see README, "Prune your own model").

A factory is any function (or class) returning an `nn.Module`. The pipeline passes `num_classes` and, when the
signature has them, `in_channels` and `image_size` (from the dataset); every other argument comes from
`model.options` and is checked against this signature. Files in nets/ are a dependency of every stage that builds
the network, so editing this file makes `dvc repro` pretrain again.
"""

from __future__ import annotations

from torch import nn


def small_cnn(num_classes: int, in_channels: int = 3, width: int = 16) -> nn.Module:
    """Three conv-BN-ReLU blocks, global pooling and a linear head; prune e.g. `0.0` and `0.3` (the first two
    convs; `0.6` feeds the head, which is fine too)."""
    return nn.Sequential(
        nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        ),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes),
    )
