"""The trainability measure: mean singular value of the input–output Jacobian (mean JSV)."""

import copy

import pytest
import torch
from torch import nn

from pipeline.runtime import Runtime
from pipeline.measure.jacobian import JacobianProbe, first_inputs, input_jacobians, mean_jacobian_singular_value
from pipeline.models import create_model
from pipeline.pruning.orthogonal import orthogonalize_
from pipeline.pruning.surgery import remove_filters
from pipeline.pruning.selection import select_filters
from pipeline.training.loop import fit, sgd

MLP_RATIOS = {"layers.[0-5]": 0.8}


def linear_mlp(seed: int = 0) -> nn.Module:
    """MLP-7-Linear on 1×16×16 inputs: 256 inputs ≥ width 100, so OrthP makes its Jacobian an exact co-isometry."""
    torch.manual_seed(seed)
    return create_model("mlp7_linear", 10, in_channels=1, image_size=16)


def weight_product(model: nn.Module) -> torch.Tensor:
    """The Jacobian of a linear MLP: its weight matrices multiplied from the last to the first."""
    product = model.layers[0].weight
    for layer in model.layers[1:]:
        product = layer.weight @ product
    return product.detach()


def test_jsv_of_a_linear_map_is_the_mean_singular_value_of_its_matrix():
    torch.manual_seed(0)
    layer = nn.Linear(20, 5, bias=False)
    expected = torch.linalg.svdvals(layer.weight.detach()).mean().item()
    assert mean_jacobian_singular_value(layer, torch.randn(7, 20)) == pytest.approx(expected, rel=1e-5)


def test_jsv_of_a_linear_mlp_is_that_of_its_weight_product():
    model = linear_mlp()
    expected = torch.linalg.svdvals(weight_product(model)).mean().item()
    inputs = torch.randn(4, 1, 16, 16)
    assert mean_jacobian_singular_value(model, inputs) == pytest.approx(expected, rel=1e-4)
    assert mean_jacobian_singular_value(model, inputs, max_samples=2) == pytest.approx(expected, rel=1e-4)


def test_batched_jacobians_equal_a_per_sample_loop_on_a_batchnorm_resnet():
    torch.manual_seed(0)
    model = create_model("resnet20", 10, in_channels=1, image_size=8)
    model.train()
    inputs = torch.randn(3, 1, 8, 8)
    batched = input_jacobians(model, inputs)
    assert model.training
    model.eval()
    looped = torch.stack([torch.autograd.functional.jacobian(lambda x: model(x.unsqueeze(0)).squeeze(0), sample)
                          for sample in inputs]).flatten(2)
    assert batched.shape == (3, 10, 64)
    torch.testing.assert_close(batched, looped, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(batched[0], batched[1])


def l1_prune(model: nn.Module, inputs: torch.Tensor) -> nn.Module:
    """The paper's trainability study: L1-prune 80% of the filters of layers 0–5, in place."""
    return remove_filters(model, select_filters(model, MLP_RATIOS), inputs[:2])


def test_l1_pruning_collapses_jsv_and_orthp_restores_isometry():
    model = linear_mlp()
    inputs = torch.randn(8, 1, 16, 16)
    isometric = orthogonalize_(copy.deepcopy(model), 1.0)
    dense = mean_jacobian_singular_value(model, inputs)
    l1 = mean_jacobian_singular_value(l1_prune(copy.deepcopy(model), inputs), inputs)
    # Observed (seeds 0-2, PyTorch default init): dense ≈ 2e-2 → L1 ≈ 1.5e-4; orthogonal dense 1.0 → L1 ≈ 6e-3.
    assert l1 < dense / 20
    assert mean_jacobian_singular_value(isometric, inputs) == pytest.approx(1, abs=1e-4)
    assert mean_jacobian_singular_value(l1_prune(isometric, inputs), inputs) < 0.05
    orthp = orthogonalize_(l1_prune(model, inputs), 1.0)
    assert mean_jacobian_singular_value(orthp, inputs) == pytest.approx(1, abs=1e-4)


def test_chunked_jsv_equals_one_pass_over_all_samples():
    torch.manual_seed(0)
    model = create_model("resnet20", 10, in_channels=1, image_size=8)
    inputs = torch.randn(7, 1, 8, 8)
    whole = mean_jacobian_singular_value(model, inputs, samples_per_chunk=7)
    assert mean_jacobian_singular_value(model, inputs, samples_per_chunk=2) == pytest.approx(whole, rel=1e-5)
    assert mean_jacobian_singular_value(model, inputs[:1]) != pytest.approx(whole, rel=1e-3)


def test_probe_inputs_are_the_first_test_images_across_batches():
    images = torch.arange(10.0).view(10, 1, 1, 1)
    batches = [(images[start:start + 4], torch.zeros(4)) for start in range(0, 10, 4)]
    assert first_inputs(batches, 6, torch.device("cpu")).flatten().tolist() == [0, 1, 2, 3, 4, 5]
    assert first_inputs(batches, 50, torch.device("cpu")).flatten().tolist() == list(range(10))


def test_probe_adds_the_mean_jsv_of_every_epoch_to_the_history():
    model = linear_mlp()
    inputs = torch.randn(8, 1, 16, 16)
    batches = [(inputs, torch.arange(8) % 10)]
    history = fit(model, batches, batches, sgd(model, 0.05, 0.9, 0.0), runtime=Runtime(torch.device("cpu")), epochs=2,
                  hooks=JacobianProbe(inputs))
    assert [set(record.extra) for record in history] == [{"mean_jsv"}, {"mean_jsv"}]
    assert history[-1].extra["mean_jsv"] == pytest.approx(mean_jacobian_singular_value(model, inputs), rel=1e-5)
    assert history[0].extra["mean_jsv"] != pytest.approx(history[1].extra["mean_jsv"], rel=1e-4)
    assert history[-1].metrics()["mean_jsv"] == history[-1].extra["mean_jsv"]
