"""The pruning methods of the registry: same selection and layer counts, only the method differs."""

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

import pipeline.methods as methods
from pipeline.runtime import Runtime
from pipeline.config import PruneConfig, RegularizerConfig
from pipeline.errors import ConfigError
from pipeline.methods import PruneContext, PruneOutcome, available_methods, run_method
from pipeline.models import create_model
from pipeline.pruning.orthogonal import activation_gain
from pipeline.pruning.surgery import prunable_layers
from pipeline.pruning.selection import select_filters

CPU = torch.device("cpu")
RATIOS = {"*layer*.conv1": 0.5}
METHODS = available_methods()  # every registered method, a new one included


def batches(count: int = 2, size: int = 8, seed: int = 0) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 8, 8, generator=generator), torch.randint(0, 10, (size,), generator=generator))
            for _ in range(count)]


@pytest.fixture(scope="module")
def dense() -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet20", 10, in_channels=1, image_size=8)


def context(dense: nn.Module, seed: int = 0) -> PruneContext:
    """A fresh copy of the dense model with its L1 selection and a 3-step TPP schedule (1 update + 2 stabilize)."""
    model = copy.deepcopy(dense)
    example = torch.randn(2, 1, 8, 8)
    settings = PruneConfig(reg=RegularizerConfig(delta=1.0, interval=1, stabilize_steps=2))
    return PruneContext(model, select_filters(model, RATIOS, example_inputs=example), example, batches(),
                        batches(1, seed=1), Runtime(CPU), settings, seed=seed)


def filters(model: nn.Module) -> dict:
    return {name: layer.weight.shape[0] for name, layer in prunable_layers(model).items()}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_keeps_the_selected_number_of_filters_and_runs(dense, method):
    ctx = context(dense)
    expected = {name: count - len(ctx.pruned.get(name, [])) for name, count in filters(dense).items()}
    outcome = run_method(method, ctx)
    assert filters(outcome.model) == expected
    assert {name: len(indices) for name, indices in outcome.pruned.items()} == \
        {name: len(indices) for name, indices in ctx.pruned.items()}
    outcome.model.eval()
    assert outcome.model(ctx.example_inputs).shape == (2, 10)


def test_random_removes_the_same_counts_at_other_seeded_indices(dense):
    l1 = context(dense).pruned
    first = run_method("random", context(dense, seed=3))
    again = run_method("random", context(dense, seed=3)).pruned
    other = run_method("random", context(dense, seed=4)).pruned
    assert all(torch.equal(first.pruned[name], again[name]) for name in l1)
    assert any(not torch.equal(first.pruned[name], l1[name]) for name in l1)
    assert any(not torch.equal(first.pruned[name], other[name]) for name in l1)
    layer = "layer1.0.conv1"
    kept = torch.ones(dense.get_submodule(layer).weight.shape[0], dtype=torch.bool)
    kept[first.pruned[layer]] = False
    assert torch.equal(first.model.get_submodule(layer).weight, dense.get_submodule(layer).weight[kept])


def test_scratch_has_the_l1_architecture_with_new_seeded_weights(dense):
    l1 = run_method("l1", context(dense)).model.state_dict()
    scratch = run_method("scratch", context(dense, seed=5)).model.state_dict()
    again = run_method("scratch", context(dense, seed=5)).model.state_dict()
    assert {key: value.shape for key, value in scratch.items()} == {key: value.shape for key, value in l1.items()}
    weights = [key for key in l1 if key.endswith("conv1.weight") or key.endswith("fc.weight")]
    assert all(not torch.allclose(scratch[key], l1[key]) for key in weights)
    assert all(torch.equal(scratch[key], again[key]) for key in scratch)


def test_l1_orthp_makes_every_weight_orthonormal_up_to_the_relu_gain(dense):
    model = run_method("l1_orthp", context(dense)).model
    gain = activation_gain(model)
    assert gain == pytest.approx(2 ** 0.5)
    for layer in prunable_layers(model).values():
        rows = layer.weight.detach().flatten(1)
        gram = rows @ rows.T if rows.shape[0] <= rows.shape[1] else rows.T @ rows
        torch.testing.assert_close(gram, gain ** 2 * torch.eye(len(gram)), rtol=0, atol=1e-5)


def test_activation_gain_follows_the_mlp_activation():
    assert activation_gain(create_model("mlp7_linear", 10, in_channels=1, image_size=8)) == 1
    relu_mlp = create_model("mlp7_linear", 10, in_channels=1, image_size=8, activation="relu")
    assert activation_gain(relu_mlp) == pytest.approx(2 ** 0.5)


def test_greg_is_tpp_without_the_gram_and_batchnorm_terms(dense, monkeypatch):
    configs = []

    class RecordingRegularizer(methods.TPPRegularizer):
        def __init__(self, model, pruned, example_inputs, config):
            configs.append(config)
            super().__init__(model, pruned, example_inputs, config)

    monkeypatch.setattr(methods, "TPPRegularizer", RecordingRegularizer)
    ctx = context(dense)
    outcome = run_method("greg", ctx)
    expected = replace(ctx.settings.reg, decorrelation=False, bn_penalty=False)
    assert configs == [expected]
    assert ctx.settings.reg.decorrelation and ctx.settings.reg.bn_penalty
    assert isinstance(outcome, PruneOutcome) and outcome.metrics["final_lambda"] == 1.0 and outcome.history


def test_unknown_method_suggests_the_closest_name(dense):
    with pytest.raises(ConfigError, match="Did you mean 'greg'"):
        run_method("gerg", context(dense))
