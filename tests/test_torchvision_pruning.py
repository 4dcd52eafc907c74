"""Any torchvision CNN by settings alone: the documented prune.layers / prune.skip patterns of
pipeline.models.torchvision_models select, regularize (one TPP step), remove and export to ONNX on every registered
torchvision family, at a small input size."""

import pytest
import torch
from torch import nn

from pipeline.config import RegularizerConfig
from pipeline.measure.export import check_onnx, export_onnx, fold_batchnorm
from pipeline.models import create_model
from pipeline.pruning.regularizer import TPPRegularizer
from pipeline.pruning.selection import select_filters
from pipeline.pruning.surgery import prunable_layers, remove_filters

# The patterns documented in pipeline/models/torchvision_models.py: model -> (prune.layers, prune.skip).
PATTERNS = {
    "resnet18": (["*layer*.conv1"], []),
    "resnet34": (["*layer*.conv1"], []),
    "resnet50": (["*layer*.conv1", "*layer*.conv2"], []),
    "mobilenet_v2": (["features.*.conv.0.0"], ["features.1.*"]),
    "efficientnet_b0": (["features.*.*.block.0.0"], ["features.1.*"]),
    "vgg16_bn": (["features.*"], ["features.0"]),
    "convnext_tiny": (["features.*.*.block.3"], []),
}
SLOW = {"resnet34", "resnet50", "vgg16_bn", "convnext_tiny", "efficientnet_b0"}   # same code paths as the fast ones, larger
EXAMPLE = torch.zeros(1, 3, 32, 32)


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name
                                  for name in PATTERNS])
def test_select_regularize_remove_and_export(name, tmp_path):
    layers, skip = PATTERNS[name]
    torch.manual_seed(0)
    model = create_model(name, 10, in_channels=3, image_size=32)
    selection = select_filters(model, {pattern: 0.5 for pattern in layers}, skip, example_inputs=EXAMPLE,
                               round_to=8)
    assert selection and all(len(indices) > 0 for indices in selection.values())

    regularizer = TPPRegularizer(model.train(), selection, EXAMPLE, RegularizerConfig(delta=0.5, interval=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    regularizer.after_optimizer_step()
    inputs, targets = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    loss = nn.functional.cross_entropy(model(inputs), targets) + regularizer.extra_loss()
    loss.backward()
    regularizer.before_optimizer_step()
    optimizer.step()
    regularizer.after_optimizer_step()

    before = {layer: module.weight.shape[0] for layer, module in prunable_layers(model).items()}
    remove_filters(model.eval(), selection, EXAMPLE)
    after = prunable_layers(model)
    for layer, indices in selection.items():
        kept = after[layer].weight.shape[0]
        assert kept == before[layer] - len(indices) and kept % 8 == 0
    assert model(inputs).shape == (4, 10)
    path = export_onnx(fold_batchnorm(model), EXAMPLE, tmp_path / f"{name}.onnx")
    assert check_onnx(path, model, inputs) <= 1e-4


def test_a_grouped_conv_the_graph_cannot_shrink_is_refused_naming_it():
    from pipeline.errors import PruningError
    model = create_model("regnet_y_400mf", 10, in_channels=3, image_size=32)
    with pytest.raises(PruningError, match=r"'trunk_output.block1.block1-0.f.a.0' cannot be pruned.*"
                                           r"'trunk_output.block1.block1-0.f.b.0', a grouped Conv2d"):
        select_filters(model, {"trunk_output.*.f.a.0": 0.5}, example_inputs=EXAMPLE)
