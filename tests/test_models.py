"""The model registry: every architecture builds and runs, names match the pruning patterns, errors explain."""

from __future__ import annotations

import fnmatch

import pytest
import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.models import available_models, create_model, register_model
from pipeline.models.cifar_resnet import PadShortcut
from pipeline.models.torchvision_models import TORCHVISION_NAMES

SMALL_MODELS = [name for name in available_models() if name not in TORCHVISION_NAMES]


def _logits(model: nn.Module, channels: int, size: int) -> torch.Tensor:
    """Eval-mode forward pass of a batch of 2 random images."""
    model.eval()
    with torch.no_grad():
        return model(torch.randn(2, channels, size, size))


def _matching(model: nn.Module, pattern: str) -> dict[str, nn.Module]:
    """The modules whose qualified names match an fnmatch pattern, as the pruning stage selects them."""
    return {name: module for name, module in model.named_modules() if fnmatch.fnmatch(name, pattern)}


def _parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def test_registry_holds_the_paper_models_sorted() -> None:
    names = available_models()
    assert names == sorted(names)
    for expected in ("resnet20", "resnet56", "resnet110", "vgg19", "mlp7_linear", "resnet50", "vgg19_bn",
                     "mobilenet_v2"):
        assert expected in names


@pytest.mark.parametrize("name", SMALL_MODELS)
@pytest.mark.parametrize(("channels", "size"), [(1, 8), (3, 32)])
def test_small_models_classify_digits_and_cifar_sized_images(name: str, channels: int, size: int) -> None:
    model = create_model(name, 10, in_channels=channels, image_size=size)
    logits = _logits(model, channels, size)
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", TORCHVISION_NAMES)
def test_torchvision_models_run_on_small_rgb_images(name: str) -> None:
    model = create_model(name, 7, in_channels=3, image_size=32)
    assert _logits(model, 3, 32).shape == (2, 7)


def test_resnet56_has_the_papers_parameter_count() -> None:
    count = _parameter_count(create_model("resnet56", 10))
    assert 840_000 <= count <= 870_000
    assert count == 853_018


@pytest.mark.parametrize(("name", "blocks"), [("resnet20", 9), ("resnet56", 27)])
def test_inner_conv_pattern_selects_one_conv_per_block(name: str, blocks: int) -> None:
    for shortcut in ("A", "B"):
        selected = _matching(create_model(name, 10, shortcut=shortcut), "*layer*.conv1")
        assert len(selected) == blocks
        assert all(isinstance(module, nn.Conv2d) for module in selected.values())


def test_resnet_uses_torchvision_module_names() -> None:
    modules = dict(create_model("resnet20", 10).named_modules())
    for name in ("conv1", "bn1", "layer1.0.conv1", "layer3.2.bn2", "layer1.0.shortcut", "avgpool", "fc"):
        assert name in modules
    assert isinstance(modules["fc"], nn.Linear)
    assert isinstance(modules["avgpool"], nn.AdaptiveAvgPool2d)


def test_shortcut_a_pads_without_parameters_and_b_projects() -> None:
    option_a = dict(create_model("resnet20", 10, shortcut="A").named_modules())
    option_b = dict(create_model("resnet20", 10, shortcut="B").named_modules())
    assert isinstance(option_a["layer2.0.shortcut"], PadShortcut)
    assert _parameter_count(option_a["layer2.0.shortcut"]) == 0
    assert isinstance(option_b["layer2.0.shortcut.0"], nn.Conv2d)
    assert isinstance(option_b["layer2.0.shortcut.1"], nn.BatchNorm2d)
    assert isinstance(option_b["layer2.1.shortcut"], nn.Identity)


def test_pad_shortcut_keeps_the_input_and_zeroes_the_new_channels() -> None:
    x = torch.randn(2, 16, 8, 8)
    out = PadShortcut(16, 32, stride=2)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any() and not out[:, 24:].any()


def test_vgg19_keeps_layer_indices_on_small_images() -> None:
    small = create_model("vgg19", 10, in_channels=1, image_size=8)
    cifar = create_model("vgg19", 10, in_channels=3, image_size=32)
    small_convs = [name for name, module in small.named_modules() if isinstance(module, nn.Conv2d)]
    cifar_convs = [name for name, module in cifar.named_modules() if isinstance(module, nn.Conv2d)]
    assert len(small_convs) == 16
    assert small_convs == cifar_convs
    assert all(name.startswith("features.") for name in small_convs)
    assert isinstance(small.classifier, nn.Linear) and small.classifier.in_features == 512
    assert _logits(small, 1, 8).shape == (2, 10)


def test_mlp7_linear_has_seven_named_linear_layers() -> None:
    model = create_model("mlp7_linear", 10, in_channels=1, image_size=8)
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    assert list(linears) == [f"layers.{index}" for index in range(7)]
    assert linears["layers.0"].in_features == 64
    assert [layer.out_features for layer in linears.values()] == [100] * 6 + [10]
    assert not any(isinstance(module, nn.BatchNorm1d) for module in model.modules())


def test_mlp7_linear_is_a_linear_map() -> None:
    model = create_model("mlp7_linear", 10, in_channels=1, image_size=8).double()
    a, b = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.randn(4, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        superposed = model(a) + model(b) - model(torch.zeros_like(a))
        assert torch.allclose(model(a + b), superposed, atol=1e-5)


def test_mlp_relu_activation_is_not_linear() -> None:
    torch.manual_seed(0)
    model = create_model("mlp7_linear", 10, in_channels=1, image_size=8, activation="relu")
    a, b = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        superposed = model(a) + model(b) - model(torch.zeros_like(a))
        assert not torch.allclose(model(a + b), superposed, atol=1e-5)


def test_mlp_width_and_depth_options() -> None:
    model = create_model("mlp7_linear", 3, in_channels=3, image_size=4, width=20, depth=3)
    assert [layer.out_features for layer in model.layers] == [20, 20, 3]
    assert model.layers[0].in_features == 48


def test_unknown_model_name_lists_available_models() -> None:
    with pytest.raises(ConfigError) as caught:
        create_model("resnet57", 10)
    message = str(caught.value)
    assert "'resnet57'" in message
    assert "Did you mean" in message
    assert all(name in message for name in available_models())


def test_unknown_option_lists_accepted_options() -> None:
    with pytest.raises(ConfigError) as caught:
        create_model("mlp7_linear", 10, widht=50)
    message = str(caught.value)
    assert "'widht'" in message and "'width'" in message
    for accepted in ("in_channels", "image_size", "width", "depth", "activation"):
        assert accepted in message


@pytest.mark.parametrize(("name", "option", "value", "allowed"), [
    ("resnet56", "shortcut", "C", "'B'"),
    ("mlp7_linear", "activation", "foo", "'tanh'"),
])
def test_bad_option_value_names_the_allowed_values(name: str, option: str, value: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as caught:
        create_model(name, 10, **{option: value})
    message = str(caught.value)
    assert option in message and repr(value) in message and allowed in message


@pytest.mark.parametrize(("option", "value"), [("width", "100"), ("width", 0), ("depth", True), ("image_size", -8)])
def test_option_of_wrong_type_or_range_is_a_config_error(option: str, value: object) -> None:
    with pytest.raises(ConfigError, match=option):
        create_model("mlp7_linear", 10, **{option: value})


def test_registering_a_taken_name_fails() -> None:
    with pytest.raises(ValueError, match="resnet20"):
        register_model("resnet20")(lambda num_classes: nn.Linear(1, num_classes))


def test_torchvision_model_on_grayscale_data_asks_for_three_channels() -> None:
    with pytest.raises(ConfigError, match="data.channels: 3"):
        create_model("resnet18", 10, in_channels=1, image_size=8)
