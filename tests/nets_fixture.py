"""Tiny networks a user might bring (`model.factory: nets_fixture.<name>`), each with one construct the dependency
graph handles specially: a spatial pad, a static split, GroupNorm, a depth-multiplier conv, a reused or unused conv,
a sigmoid between conv and consumer, SyncBatchNorm. All take 3x16x16 or larger inputs and have an `out` head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Plain(nn.Module):
    """conv-BN-ReLU x2, pooled, linear head: `a` and `b` prune cleanly."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 8) -> None:
        super().__init__()
        self.a = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(width)
        self.b = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(2 * width)
        self.out = nn.Linear(2 * width, num_classes)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn_b(self.b(F.relu(self.bn_a(self.a(x))))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.adaptive_avg_pool2d(self.trunk(x), 1).flatten(1))


def make_net(num_classes: int, in_channels: int = 3, width: int = 8) -> nn.Module:
    return Plain(num_classes, in_channels, width)


def needs_depth(num_classes: int, depth: int) -> nn.Module:
    """A factory with a required option."""
    return Plain(num_classes)


def returns_dict(num_classes: int) -> dict:
    return {"model": Plain(num_classes)}


class SpatialPad(Plain):
    """TF-style 'same' padding: F.pad on H and W only, between `a` and `b`."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__(num_classes, in_channels)
        self.b = nn.Conv2d(8, 16, 3, padding=0, bias=False)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn_a(self.a(x)))
        return F.relu(self.bn_b(self.b(F.pad(y, (1, 1, 1, 1)))))


class StaticSplit(Plain):
    """Splits `a`'s output by a stored size: removing `a`'s filters breaks the forward."""

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn_a(self.a(x)))
        first, second = torch.split(y, 4, dim=1)
        return F.relu(self.bn_b(self.b(torch.cat([second, first], 1))))


class StaticSlice(Plain):
    """Uses a stored channel count (a slice): after removal the widths no longer add up."""

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn_a(self.a(x)))
        y = torch.cat([y[:, :4] * 2, y[:, 4:]], 1)
        return F.relu(self.bn_b(self.b(y)))


class GroupNormNet(Plain):
    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__(num_classes, in_channels)
        self.bn_a = nn.GroupNorm(4, 8)


class DepthMultiplier(Plain):
    """`a` feeds a depthwise conv with channel multiplier 2 (groups == in_channels != out_channels)."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__(num_classes, in_channels)
        self.b = nn.Conv2d(8, 16, 3, padding=1, groups=8, bias=False)


class Reused(Plain):
    """`b2` is called twice per forward (shared weights)."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__(num_classes, in_channels)
        self.b2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        y = super().trunk(x)
        return F.relu(self.b2(F.relu(self.b2(y))))


class Unused(Plain):
    """`aux` exists but the forward never calls it."""

    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__(num_classes, in_channels)
        self.aux = nn.Conv2d(16, 16, 1)


class SigmoidGate(Plain):
    """`a` is followed by BN and a sigmoid (sigmoid(0) = 0.5): zeroing filters is not removing them."""

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn_b(self.b(torch.sigmoid(self.bn_a(self.a(x))))))


class SyncBN(Plain):
    def __init__(self, num_classes: int, in_channels: int = 3) -> None:
        super().__init__(num_classes, in_channels)
        self.bn_a = nn.SyncBatchNorm(8)


class ChannelShuffle(Plain):
    """A view-transpose channel shuffle between `a` and `b` (ShuffleNet)."""

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn_a(self.a(x)))
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return F.relu(self.bn_b(self.b(y)))


class Flip(Plain):
    """Reverses the channel order between `a` and `b`: removal runs but pairs the wrong channels."""

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn_a(self.a(x))).flip(1)
        return F.relu(self.bn_b(self.b(y)))
