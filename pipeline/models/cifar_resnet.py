"""CIFAR ResNets (He et al., 2016, section 4.2) as in the TPP paper's reference code.

Three stages of n BasicBlocks (n = (depth - 2) / 6) with 16/32/64 filters and strides 1/2/2. Module names follow
torchvision (`conv1`, `bn1`, `layer1`..`layer3`, `avgpool`, `fc`; blocks hold `conv1`, `bn1`, `conv2`, `bn2`,
`shortcut`), so the pattern `*layer*.conv1` selects exactly the inner conv of every block, the layers TPP prunes.
Global average pooling makes the network work at any input size, e.g. 8x8 digits as well as 32x32 CIFAR.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.registry import check_choice, register_model

STAGE_WIDTHS = (16, 32, 64)
STAGE_STRIDES = (1, 2, 2)
SHORTCUT_OPTIONS = ("A", "B")


class PadShortcut(nn.Module):
    """Option A shortcut: subsample spatially and zero-pad the new channels, adding no parameters."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad_before = (out_planes - in_planes) // 2
        self.pad_after = out_planes - in_planes - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        subsampled = x[:, :, ::self.stride, ::self.stride]
        return F.pad(subsampled, (0, 0, 0, 0, self.pad_before, self.pad_after))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad_channels=({self.pad_before}, {self.pad_after})"


def make_shortcut(in_planes: int, out_planes: int, stride: int, option: str) -> nn.Module:
    """Identity when shapes match; otherwise zero-padding (A) or a 1x1 conv + BN projection (B)."""
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    if option == "A":
        return PadShortcut(in_planes, out_planes, stride)
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection; ReLU after the first and after the sum."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = make_shortcut(in_planes, planes, stride, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The 6n+2-layer CIFAR ResNet: a stem conv, three stages of n blocks, global pooling and a linear head."""

    def __init__(self, blocks_per_stage: int, num_classes: int, in_channels: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, STAGE_WIDTHS[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        in_planes = STAGE_WIDTHS[0]
        stages = []
        for planes, stride in zip(STAGE_WIDTHS, STAGE_STRIDES):
            stages.append(_make_stage(in_planes, planes, stride, blocks_per_stage, shortcut))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(STAGE_WIDTHS[-1], num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(self.avgpool(out), 1))


def _make_stage(in_planes: int, planes: int, stride: int, blocks: int, shortcut: str) -> nn.Sequential:
    """A stage whose first block changes width and resolution and whose others keep them."""
    strides = [stride] + [1] * (blocks - 1)
    layers = []
    for block_stride in strides:
        layers.append(BasicBlock(in_planes, planes, block_stride, shortcut))
        in_planes = planes
    return nn.Sequential(*layers)


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal weights for convs and the head, as the reference code does."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight)


def cifar_resnet(depth: int, num_classes: int, in_channels: int, shortcut: str) -> CifarResNet:
    """Build the CIFAR ResNet of the given depth (6n+2) after checking the shortcut option."""
    check_choice("shortcut", shortcut, SHORTCUT_OPTIONS)
    return CifarResNet((depth - 2) // 6, num_classes, in_channels, shortcut)


@register_model("resnet20")
def resnet20(num_classes: int, in_channels: int = 3, image_size: int = 32, shortcut: str = "A") -> CifarResNet:
    """ResNet-20 (0.27 M parameters); image_size is unused thanks to global pooling."""
    return cifar_resnet(20, num_classes, in_channels, shortcut)


@register_model("resnet32")
def resnet32(num_classes: int, in_channels: int = 3, image_size: int = 32, shortcut: str = "A") -> CifarResNet:
    """ResNet-32 (0.46 M parameters); image_size is unused thanks to global pooling."""
    return cifar_resnet(32, num_classes, in_channels, shortcut)


@register_model("resnet44")
def resnet44(num_classes: int, in_channels: int = 3, image_size: int = 32, shortcut: str = "A") -> CifarResNet:
    """ResNet-44 (0.66 M parameters); image_size is unused thanks to global pooling."""
    return cifar_resnet(44, num_classes, in_channels, shortcut)


@register_model("resnet56")
def resnet56(num_classes: int, in_channels: int = 3, image_size: int = 32, shortcut: str = "A") -> CifarResNet:
    """ResNet-56 (0.85 M parameters), the TPP paper's main CIFAR network; image_size is unused."""
    return cifar_resnet(56, num_classes, in_channels, shortcut)


@register_model("resnet110")
def resnet110(num_classes: int, in_channels: int = 3, image_size: int = 32, shortcut: str = "A") -> CifarResNet:
    """ResNet-110 (1.7 M parameters); image_size is unused thanks to global pooling."""
    return cifar_resnet(110, num_classes, in_channels, shortcut)
