"""torchvision ImageNet models under their torchvision names (resnet50, mobilenet_v2, convnext_tiny, ...).

They are built with `torchvision.models.get_model`, so module names are torchvision's own and pruning patterns read
like torchvision's code. The CIFAR models of this package use other names (resnet20..resnet110, vgg11..vgg19), so
the two families never clash. These stem convs expect 3 channels, so a 1-channel dataset is refused up front
rather than failing deep inside a forward pass.

Which layers to prune (prune.layers / prune.skip), i.e. what Torch-Pruning removes cleanly. Every pattern names the
first conv of a residual block's inner branch, never the residual stream, as the paper does:

| model | prune.layers | prune.skip |
|---|---|---|
| resnet18, resnet34 | `*layer*.conv1` | |
| resnet50, resnet101 | `*layer*.conv1`, `*layer*.conv2` (paper: `*layer[1-3]*conv[1-2]` + `*layer4*conv[1-2]`) | |
| vgg16_bn, vgg19_bn | `features.*` (no residual stream: every conv) | `features.0` |
| mobilenet_v2 | `features.*.conv.0.0` (the 1×1 expansion conv) | `features.1.*` (no expansion there) |
| efficientnet_b0 | `features.*.*.block.0.0` (the 1×1 expansion conv; its SE block follows) | `features.1.*` |
| convnext_tiny | `features.*.*.block.3` (the first pointwise Linear, 4× wide) | |

regnet_y_400mf is registered, but its bottlenecks feed grouped convs (groups of 8 channels), which Torch-Pruning cannot
shrink channel by channel: selecting `trunk_output.*.f.a.0` is refused with an error naming the grouped conv.

`model.pretrained: true` starts from torchvision's published weights (see `pipeline.checkpoint.dense_model`);
the architecture itself is always built without them, so rebuilding a checkpoint never downloads anything.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import torch
import torchvision
from torch import nn

from pipeline.errors import ConfigError, PipelineError
from pipeline.models.registry import register_model

TORCHVISION_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "vgg16_bn", "vgg19_bn", "mobilenet_v2",
                     "efficientnet_b0", "convnext_tiny", "regnet_y_400mf")


def build_torchvision_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """torchvision's `name`, randomly initialised, with a `num_classes`-way head."""
    if in_channels != 3:
        raise ConfigError(f"Model '{name}' is a torchvision ImageNet model and needs 3-channel images, but the "
                          f"dataset gives {in_channels}. Set `data.channels: 3` in params.yaml, or pick a CIFAR "
                          f"model such as resnet56, which takes any number of channels.")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def pretrained_state_dict(name: str) -> Dict[str, Any]:
    """torchvision's default published weights of `name` (downloaded once into torch's cache), or a
    PipelineError saying how to get them on a machine without internet."""
    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PipelineError(f"Could not get the pretrained weights of '{name}' ({weights}) from {weights.url}: "
                            f"{reason}. This machine may be offline: download them once on a machine with internet "
                            f"(`python -c \"import torchvision; torchvision.models.get_model('{name}', "
                            f"weights='DEFAULT')\"`) and copy {torch.hub.get_dir()}/checkpoints to the same place "
                            f"here (set TORCH_HOME to move it), or point model.checkpoint at the .pth file and set "
                            f"model.pretrained: false.") from None


def _make_factory(name: str) -> Callable[..., nn.Module]:
    """A registry factory for one torchvision architecture, with the pipeline's standard signature."""

    def factory(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
        """torchvision's model; image_size is unused because these networks pool adaptively."""
        return build_torchvision_model(name, num_classes, in_channels)

    factory.__name__ = factory.__qualname__ = name
    return factory


for _name in TORCHVISION_NAMES:
    register_model(_name)(_make_factory(_name))
