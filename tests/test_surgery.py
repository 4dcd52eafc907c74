"""Physical removal: the smaller network computes exactly what the dense one does with those filters zeroed."""

import copy

import pytest
import torch
from torch import nn

from pipeline.models import create_model
from pipeline.pruning.surgery import build_graph, group_members, remove_filters
from pipeline.pruning.selection import select_filters


def randomize_batchnorm(model: nn.Module) -> None:
    """Non-trivial BN statistics and affine terms, so zeroed γ/β really matter."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            size = module.num_features
            module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(size, generator=generator) * 0.1)


def zero_removed_outputs(model: nn.Module, pruned: dict, example: torch.Tensor) -> None:
    """The oracle: zero everything removal takes away (filter rows, biases, BatchNorm scale and shift), found
    through the same dependency graph."""
    graph = build_graph(model, example)
    with torch.no_grad():
        for name, indices in pruned.items():
            for member in group_members(graph, model.get_submodule(name), indices.tolist()):
                for parameter in (getattr(member.module, "weight", None), getattr(member.module, "bias", None)):
                    if parameter is not None:
                        parameter[member.indices] = 0


CASES = [
    ("resnet56", {}, (3, 32, 32), {"*layer*.conv1": 0.5}, ()),
    ("resnet20", {"shortcut": "B"}, (3, 16, 16), {"layer1.0.conv2": 0.5, "layer2.*.conv1": 0.7}, ()),
    ("vgg19", {}, (3, 32, 32), {"features.*": 0.5}, ("features.0",)),
    ("mlp7_linear", {}, (1, 8, 8), {"layers.[0-5]": 0.8}, ()),
    ("resnet50", {}, (3, 32, 32), {"*layer[1-3]*conv[1-2]": 0.3, "*layer4*conv[1-2]": 0.14}, ()),
]


@pytest.mark.parametrize("name, options, shape, ratios, skip", CASES, ids=[case[0] for case in CASES])
def test_removed_network_equals_dense_network_with_filters_zeroed(name, options, shape, ratios, skip):
    torch.manual_seed(0)
    model = create_model(name, 10, in_channels=shape[0], image_size=shape[-1], **options)
    randomize_batchnorm(model)
    model.eval()
    example = torch.zeros(1, *shape)
    pruned = select_filters(model, ratios, skip, example_inputs=example)
    zeroed = copy.deepcopy(model)
    zero_removed_outputs(zeroed, pruned, example)
    dense_parameters = sum(p.numel() for p in model.parameters())

    small = remove_filters(model, pruned, example)

    inputs = torch.randn(4, *shape)
    with torch.no_grad():
        expected, got = zeroed(inputs), small(inputs)
    assert sum(p.numel() for p in small.parameters()) < dense_parameters
    for layer, indices in pruned.items():
        assert small.get_submodule(layer).weight.shape[0] == zeroed.get_submodule(layer).weight.shape[0] - len(indices)
    assert torch.allclose(got, expected, atol=1e-5 * max(1.0, expected.abs().max().item()))


def test_removal_keeps_training_mode():
    model = create_model("resnet20", 10, in_channels=1, image_size=8)
    model.train()
    remove_filters(model, {"layer1.0.conv1": torch.tensor([0, 1])}, torch.zeros(1, 1, 8, 8))
    assert model.training
    assert model.layer1[0].conv1.out_channels == 14 and model.layer1[0].conv2.in_channels == 14
