"""CIFAR-style VGG with BatchNorm: the standard conv configurations, global average pooling and one linear head.

`features` is a flat nn.Sequential (Conv2d 3x3, BatchNorm2d, ReLU per conv; MaxPool2d(2) per "M"), so layers are
addressed as `features.N`. On small images a max-pool that would shrink the feature map below 1x1 becomes
nn.Identity: the network still runs on 8x8 digits and `features.N` names the same layer at every image size,
which keeps pruning patterns and checkpoints portable between datasets.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.registry import register_model

POOL = "M"
VGG_CONFIGS: dict[int, tuple[int | str, ...]] = {
    11: (64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    13: (64, 64, POOL, 128, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    16: (64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512, POOL),
    19: (64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL, 512, 512, 512, 512, POOL,
         512, 512, 512, 512, POOL),
}


class CifarVGG(nn.Module):
    """VGG-BN feature extractor, global average pooling, and a single linear classifier."""

    def __init__(self, config: tuple[int | str, ...], num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.features = make_features(config, in_channels, image_size)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        last_width = [entry for entry in config if entry != POOL][-1]
        self.classifier = nn.Linear(last_width, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def make_features(config: tuple[int | str, ...], in_channels: int, image_size: int) -> nn.Sequential:
    """The conv stack; pools that would go below 1x1 are nn.Identity so module indices never shift."""
    layers: list[nn.Module] = []
    size = image_size
    for entry in config:
        if entry == POOL:
            if size >= 2:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                size //= 2
            else:
                layers.append(nn.Identity())
            continue
        layers += [nn.Conv2d(in_channels, entry, kernel_size=3, padding=1), nn.BatchNorm2d(entry),
                   nn.ReLU(inplace=True)]
        in_channels = entry
    return nn.Sequential(*layers)


def _init_weights(model: nn.Module) -> None:
    """torchvision's VGG initialisation: Kaiming (fan-out) convs, unit BN, small-normal head."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)


@register_model("vgg11")
def vgg11(num_classes: int, in_channels: int = 3, image_size: int = 32) -> CifarVGG:
    """VGG-11 with BatchNorm, CIFAR style."""
    return CifarVGG(VGG_CONFIGS[11], num_classes, in_channels, image_size)


@register_model("vgg13")
def vgg13(num_classes: int, in_channels: int = 3, image_size: int = 32) -> CifarVGG:
    """VGG-13 with BatchNorm, CIFAR style."""
    return CifarVGG(VGG_CONFIGS[13], num_classes, in_channels, image_size)


@register_model("vgg16")
def vgg16(num_classes: int, in_channels: int = 3, image_size: int = 32) -> CifarVGG:
    """VGG-16 with BatchNorm, CIFAR style."""
    return CifarVGG(VGG_CONFIGS[16], num_classes, in_channels, image_size)


@register_model("vgg19")
def vgg19(num_classes: int, in_channels: int = 3, image_size: int = 32) -> CifarVGG:
    """VGG-19 with BatchNorm, CIFAR style: the TPP paper's second CIFAR network."""
    return CifarVGG(VGG_CONFIGS[19], num_classes, in_channels, image_size)
