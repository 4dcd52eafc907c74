"""torchvision ImageNet models under their torchvision names (resnet50, vgg19_bn, mobilenet_v2, ...).

They are built with `torchvision.models.get_model`, so module names are torchvision's own. The CIFAR models of
this package use other names (resnet20..resnet110, vgg11..vgg19), so the two families never clash.
With `pretrained: true` the torchvision default ImageNet weights are loaded; these stem convs expect 3 channels,
so a 1-channel dataset is refused up front rather than failing deep inside a forward pass.
"""

from __future__ import annotations

from typing import Callable

import torch
import torchvision
from torch import nn

from pipeline.errors import ConfigError, PipelineError
from pipeline.models import register_model

TORCHVISION_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "vgg16_bn", "vgg19_bn", "mobilenet_v2")
IMAGENET_CLASSES = 1000


def build_torchvision_model(name: str, num_classes: int, in_channels: int, pretrained: bool) -> nn.Module:
    """Build torchvision's `name`; pretrained weights come with a 1000-class head, replaced when needed."""
    if in_channels != 3:
        raise ConfigError(f"Model '{name}' is a torchvision ImageNet model and needs 3-channel images, but the "
                          f"dataset gives {in_channels}. Set `data.channels: 3` in params.yaml, or pick a CIFAR "
                          f"model such as resnet56, which takes any number of channels.")
    if not pretrained:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    model = _load_pretrained(name)
    if num_classes != IMAGENET_CLASSES:
        _replace_head(model, num_classes)
    return model


def _load_pretrained(name: str) -> nn.Module:
    """The model with torchvision's default ImageNet weights, or a PipelineError saying how to get them."""
    try:
        return torchvision.models.get_model(name, weights="DEFAULT")
    except OSError as error:
        raise PipelineError(f"Could not download the pretrained weights of '{name}' ({error}). Run the stage "
                            f"once on a machine with internet access, then copy torch's cache directory "
                            f"{torch.hub.get_dir()}/checkpoints to this machine (set TORCH_HOME to move it), "
                            f"or set model.options.pretrained: false.") from None


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap the last Linear layer (the ImageNet classifier) for a fresh one with `num_classes` outputs."""
    head_name, head = [(module_name, module) for module_name, module in model.named_modules()
                       if isinstance(module, nn.Linear)][-1]
    model.set_submodule(head_name, nn.Linear(head.in_features, num_classes))


def _make_factory(name: str) -> Callable[..., nn.Module]:
    """A registry factory for one torchvision architecture, with the pipeline's standard signature."""

    def factory(num_classes: int, in_channels: int = 3, image_size: int = 32, pretrained: bool = False) -> nn.Module:
        """torchvision's model; image_size is unused because these networks pool adaptively."""
        return build_torchvision_model(name, num_classes, in_channels, pretrained)

    factory.__name__ = factory.__qualname__ = name
    return factory


for _name in TORCHVISION_NAMES:
    register_model(_name)(_make_factory(_name))
