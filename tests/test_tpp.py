"""TPP's formulas, schedule, gradient injection and filter selection."""

import copy

import pytest
import torch
from torch import nn

from pipeline.runtime import Runtime
from pipeline.config import RegularizerConfig
from pipeline.errors import ConfigError, PruningError
from pipeline.models import create_model
from pipeline.pruning.surgery import build_graph, group_members
from pipeline.pruning.selection import layer_ratios, pruned_count, select_filters
from pipeline.pruning.regularizer import (LambdaSchedule, TPPRegularizer, batched_gram_penalty,
                                          pruned_pair_mask)
from pipeline.training.loop import fit, sgd


def direct_decorrelation(weight: torch.Tensor, pruned: list) -> torch.Tensor:
    """The paper's definition, entry by entry: mean over N² of ((G − T)²)."""
    rows = weight.flatten(1)
    n = rows.shape[0]
    total = torch.zeros(())
    for i in range(n):
        for j in range(n):
            g = rows[i] @ rows[j]
            target = 0.0 if (i in pruned or j in pruned) else g.item()
            total = total + (g - target) ** 2
    return total / n**2


def decorrelation_loss(weight: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """One layer's Gram term through the library's batched path (a batch of one)."""
    return batched_gram_penalty([weight], pruned_pair_mask(weight.shape[0], pruned, weight.device)[None])


def masked_gram_penalty(weight: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """The oracle for one layer, written independently of the batched path: mean((W Wᵀ ⊙ mask)²)."""
    rows = weight.flatten(1)
    mask = torch.ones(len(rows), len(rows))
    kept = [i for i in range(len(rows)) if i not in pruned.tolist()]
    mask[torch.tensor(kept)[:, None], torch.tensor(kept)[None, :]] = 0
    return ((rows @ rows.T) * mask).pow(2).mean()


@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (10, 7)])
def test_decorrelation_loss_equals_direct_computation(shape):
    torch.manual_seed(0)
    weight = torch.randn(shape)
    pruned = [1, 4, 5]
    expected = direct_decorrelation(weight, pruned)
    assert decorrelation_loss(weight, torch.tensor(pruned)).item() == pytest.approx(expected.item(), rel=1e-5)


def test_decorrelation_loss_is_zero_when_pruned_filters_are_zero():
    weight = torch.randn(6, 4, 3, 3)
    pruned = torch.tensor([0, 2])
    assert decorrelation_loss(weight, pruned).item() > 0
    weight[pruned] = 0
    assert decorrelation_loss(weight, pruned).item() == 0


def test_kept_filter_gradient_lies_in_span_of_pruned_filters():
    torch.manual_seed(1)
    weight = torch.randn(12, 30, requires_grad=True)
    pruned = torch.tensor([2, 7, 9])
    decorrelation_loss(weight, pruned).backward()
    kept = [i for i in range(12) if i not in pruned.tolist()]
    basis = weight.detach()[pruned].T
    kept_grads = weight.grad[kept].T
    coefficients = torch.linalg.lstsq(basis, kept_grads).solution
    residual = kept_grads - basis @ coefficients
    assert kept_grads.abs().max() > 1e-3
    assert residual.abs().max() < 1e-5 * kept_grads.abs().max()


def test_no_pruned_filters_means_no_loss_and_no_gradient():
    weight = torch.randn(5, 9, requires_grad=True)
    loss = decorrelation_loss(weight, torch.tensor([], dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and weight.grad.abs().max() == 0


def test_lambda_schedule_matches_the_paper_formula():
    schedule = LambdaSchedule(delta=1e-4, interval=10, max_lambda=1.0, stabilize_steps=10000)
    assert schedule(0) == 0 and schedule(9) == 0
    assert schedule(10) == pytest.approx(1e-4)
    assert schedule(25) == pytest.approx(2e-4)
    assert schedule(10**7) == 1.0
    assert schedule.update_steps == 100_000
    assert schedule.total_steps == 110_000
    assert schedule(schedule.update_steps) == pytest.approx(1.0)
    assert schedule(schedule.update_steps - 1) < 1.0


@pytest.mark.parametrize("ratio, filters, expected", [(0.95, 16, 15), (0.3, 10, 3), (0.7, 10, 7), (0.5, 16, 8),
                                                      (0.9, 64, 58), (0.99, 100, 99), (0.999, 16, 15), (0.3, 1, 0)])
def test_pruned_count_follows_the_paper_rule(ratio, filters, expected):
    assert pruned_count(ratio, filters) == expected


def test_layer_ratios_last_match_wins_and_skip_forces_zero():
    names = ["layer1.0.conv1", "layer1.0.conv2", "layer4.0.conv1", "fc"]
    ratios = {"*conv*": 0.3, "layer4*": 0.14}
    resolved = layer_ratios(names, ratios, skip=["layer1.0.conv2"])
    assert resolved == {"layer1.0.conv1": 0.3, "layer1.0.conv2": 0.0, "layer4.0.conv1": 0.14, "fc": 0.0}


def test_select_filters_picks_smallest_mean_abs_filters():
    model = create_model("resnet20", 10, in_channels=1, image_size=8)
    conv = model.layer1[0].conv1
    with torch.no_grad():
        conv.weight.copy_(torch.arange(16, dtype=torch.float32).flip(0).view(16, 1, 1, 1).expand_as(conv.weight))
    pruned = select_filters(model, {"layer1.0.conv1": 0.25})
    assert list(pruned) == ["layer1.0.conv1"]
    assert pruned["layer1.0.conv1"].tolist() == [12, 13, 14, 15]


def test_select_filters_paper_pattern_on_resnet56():
    model = create_model("resnet56", 10)
    pruned = select_filters(model, {"*layer*.conv1": 0.9}, example_inputs=torch.zeros(1, 3, 32, 32))
    assert len(pruned) == 27
    assert all(name.endswith(".conv1") and name.startswith("layer") for name in pruned)
    counts = {model.get_submodule(name).out_channels: len(idx) for name, idx in pruned.items()}
    assert counts == {16: 15, 32: 29, 64: 58}


def test_unmatched_pattern_lists_real_layer_names():
    model = create_model("resnet20", 10, in_channels=1, image_size=8)
    with pytest.raises(PruningError, match=r"'\*block\*\.conv1' matches no .*layer1\.0\.conv1"):
        select_filters(model, {"*block*.conv1": 0.5})


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_ratio_outside_unit_interval_is_refused(ratio):
    model = create_model("resnet20", 10, in_channels=1, image_size=8)
    with pytest.raises(PruningError, match="outside \\[0, 1\\)"):
        select_filters(model, {"*layer*.conv1": ratio})


def test_residual_stream_through_zero_padding_shortcut_is_refused():
    model = create_model("resnet20", 10, in_channels=1, image_size=8, shortcut="A")
    with pytest.raises(PruningError, match="zero-pad.*shortcut: B"):
        select_filters(model, {"layer1.0.conv2": 0.5}, example_inputs=torch.zeros(1, 1, 8, 8))


def test_output_layer_and_coupled_layers_are_refused():
    model = create_model("resnet20", 10, in_channels=1, image_size=8, shortcut="B")
    example = torch.zeros(1, 1, 8, 8)
    with pytest.raises(PruningError, match="network's output"):
        select_filters(model, {"fc": 0.5}, example_inputs=example)
    with pytest.raises(PruningError, match="share their output channels"):
        select_filters(model, {"layer1.0.conv2": 0.5, "layer1.1.conv2": 0.5}, example_inputs=example)


class ShuffledRegistration(nn.Module):
    """BatchNorms registered before the convs and in swapped order: module order must not be trusted."""

    def __init__(self):
        super().__init__()
        self.bn_b = nn.BatchNorm2d(8)
        self.bn_a = nn.BatchNorm2d(6)
        self.conv_b = nn.Conv2d(6, 8, 3, padding=1)
        self.conv_a = nn.Conv2d(1, 6, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.bn_a(self.conv_a(x)))
        x = torch.relu(self.bn_b(self.conv_b(x)))
        return self.fc(x.mean(dim=(2, 3)))


def test_consuming_batchnorm_is_found_through_the_graph():
    model = ShuffledRegistration()
    members = group_members(build_graph(model, torch.zeros(1, 1, 6, 6)), model.conv_a, [0, 1])
    assert sorted(m.name for m in members) == ["bn_a", "conv_a"]


def test_gradient_injection_equals_explicit_half_lambda_l2_loss():
    torch.manual_seed(0)
    model = ShuffledRegistration()
    reference = copy.deepcopy(model)
    inputs, targets = torch.randn(4, 1, 6, 6), torch.tensor([0, 1, 2, 0])
    pruned = {"conv_a": torch.tensor([1, 4]), "conv_b": torch.tensor([0])}
    config = RegularizerConfig(alpha=0.0, delta=0.5, interval=1, max_lambda=1.0, stabilize_steps=0)
    regularizer = TPPRegularizer(model, pruned, torch.zeros(1, 1, 6, 6), config)
    regularizer.iteration = 1
    lam = regularizer.current_lambda
    assert lam == 0.5

    nn.functional.cross_entropy(model(inputs), targets).backward()
    regularizer.before_optimizer_step()

    explicit = nn.functional.cross_entropy(reference(inputs), targets)
    for conv, bn, idx in ((reference.conv_a, reference.bn_a, pruned["conv_a"]),
                          (reference.conv_b, reference.bn_b, pruned["conv_b"])):
        for parameter in (conv.weight, conv.bias, bn.weight, bn.bias):
            explicit = explicit + lam / 2 * parameter[idx].pow(2).sum()
    explicit.backward()
    for (name, got), (_, want) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.allclose(got.grad, want.grad, atol=1e-6), name


def test_bn_penalty_switch_leaves_batchnorm_gradients_alone():
    model = ShuffledRegistration()
    config = RegularizerConfig(delta=1.0, interval=1, stabilize_steps=0, bn_penalty=False)
    regularizer = TPPRegularizer(model, {"conv_a": torch.tensor([0])}, torch.zeros(1, 1, 6, 6), config)
    penalized = {id(t.parameter) for t in regularizer.penalized}
    assert id(model.conv_a.weight) in penalized and id(model.bn_a.weight) not in penalized


def test_regularized_training_drives_pruned_filters_to_zero_and_keeps_the_rest():
    torch.manual_seed(0)
    model = create_model("resnet20", 4, in_channels=1, image_size=8)
    batches = [(torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))) for _ in range(4)]
    pruned = select_filters(model, {"*layer*.conv1": 0.5})
    config = RegularizerConfig(delta=0.25, interval=1, max_lambda=1.0, stabilize_steps=150, zero_out=False)
    regularizer = TPPRegularizer(model, pruned, torch.zeros(1, 1, 8, 8), config)
    optimizer = sgd(model, lr=0.05, momentum=0.9, weight_decay=0.0)
    history = fit(model, batches, batches[:1], optimizer, runtime=Runtime(torch.device("cpu")),
                  max_steps=regularizer.schedule.total_steps, hooks=regularizer)
    assert history[-1].step == regularizer.schedule.total_steps == 154
    conv = model.layer1[0].conv1
    idx = pruned["layer1.0.conv1"]
    kept = torch.ones(conv.out_channels, dtype=torch.bool)
    kept[idx] = False
    assert conv.weight[idx].norm() < 1e-3 * conv.weight[kept].norm()
    assert model.layer1[0].bn1.weight[idx].abs().max() < 1e-3


def reference_zero_out_due(step_index: int, schedule: LambdaSchedule, layer_index: int, interval: int) -> bool:
    """The reference's rule (`opp_pruner.py`, `_layerwise_zero_out`), written from its own counters: the stabilize
    phase starts at the first iteration whose λ reaches its maximum; after the optimizer step of iteration t, a layer
    with index i among all learnable layers is zeroed when t − t_stabilize ≥ (i + 1)·interval, at every such t."""
    stabilize_start = next(t for t in range(10**6) if schedule(t) >= schedule.max_lambda)
    return step_index - stabilize_start >= (layer_index + 1) * interval


def test_zero_out_follows_the_reference_rule_at_every_step():
    """conv_a runs first but is registered second: the index is the forward order among all learnable layers
    (conv_a 0, conv_b 1, fc 2), and a due layer is zeroed again after every step, not once."""
    model = ShuffledRegistration()
    pruned = {"conv_a": torch.tensor([0, 3]), "conv_b": torch.tensor([1, 2, 5])}
    config = RegularizerConfig(alpha=0.0, delta=0.5, interval=1, max_lambda=1.0, stabilize_steps=8, zero_out=True,
                               zero_out_interval=2)
    regularizer = TPPRegularizer(model, pruned, torch.zeros(1, 1, 6, 6), config)
    bns = {"conv_a": model.bn_a, "conv_b": model.bn_b}
    seen_due = set()
    for step_index in range(regularizer.schedule.total_steps):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(0.5)
        regularizer.after_optimizer_step()
        for layer_index, name in enumerate(("conv_a", "conv_b")):
            due = reference_zero_out_due(step_index, regularizer.schedule, layer_index, config.zero_out_interval)
            conv, rows = model.get_submodule(name), pruned[name]
            assert (conv.weight[rows].abs().max() == 0) == due, (step_index, name)
            assert (bns[name].weight[rows].abs().max() == 0) == due and (bns[name].bias[rows].abs().max() == 0) == due
            kept = torch.ones(conv.out_channels, dtype=torch.bool)
            kept[rows] = False
            assert conv.weight[kept].abs().min() > 0 and conv.bias.abs().min() > 0
            if due:
                seen_due.add((step_index, name))
    assert {name for _, name in seen_due} == {"conv_a", "conv_b"} and len(seen_due) > 2


def test_zero_out_with_a_stabilize_phase_too_short_for_every_layer_is_refused():
    config = RegularizerConfig(delta=0.5, interval=1, stabilize_steps=5, zero_out=True, zero_out_interval=2)
    with pytest.raises(ConfigError, match=r"stabilize_steps' \(5\).*3 learnable layers = 6"):
        TPPRegularizer(ShuffledRegistration(), {"conv_a": torch.tensor([0])}, torch.zeros(1, 1, 6, 6), config)


# --- the capture-friendly regularizer equals the per-layer formulas --------------------------------------------

RESNET56_EXAMPLE = torch.zeros(1, 3, 32, 32)


@pytest.fixture(scope="module")
def resnet56_tpp():
    """ResNet56 with the paper's CIFAR pattern pruned at 0.9: 27 layers in 5 weight shapes."""
    torch.manual_seed(0)
    model = create_model("resnet56", 10)
    pruned = select_filters(model, {"*layer*.conv1": 0.9}, example_inputs=RESNET56_EXAMPLE)
    config = RegularizerConfig(alpha=1000.0, delta=0.1, interval=1, max_lambda=1.0, stabilize_steps=5)
    regularizer = TPPRegularizer(model, pruned, RESNET56_EXAMPLE, config)
    return model.train(), pruned, regularizer


def test_batched_gram_terms_equal_the_per_layer_sum_on_resnet56(resnet56_tpp):
    model, pruned, regularizer = resnet56_tpp
    regularizer.iteration = 3
    assert len(regularizer.groups) == 5 and sum(len(group.weights) for group in regularizer.groups) == 27
    weights = [model.get_submodule(name).weight for name in pruned]
    batched = regularizer.extra_loss()
    batched_grads = torch.autograd.grad(batched, weights)
    reference = regularizer.config.alpha * regularizer.current_lambda * sum(
        masked_gram_penalty(model.get_submodule(name).weight, indices) for name, indices in pruned.items())
    reference_grads = torch.autograd.grad(reference, weights)
    assert batched.item() == pytest.approx(reference.item(), rel=1e-6)
    for got, want in zip(batched_grads, reference_grads):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
def test_foreach_injection_equals_per_layer_l2_and_bn_terms_on_resnet56(resnet56_tpp, channels_last):
    model, pruned, regularizer = resnet56_tpp
    model = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    regularizer.iteration = 4
    lam = regularizer.current_lambda
    generator = torch.Generator().manual_seed(1)
    for parameter in model.parameters():
        parameter.grad = torch.randn(parameter.shape, generator=generator).to(memory_format=torch.preserve_format)
    expected = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    for name, indices in pruned.items():
        block = name.rsplit(".", 1)[0]
        for parameter_name in (f"{name}.weight", f"{block}.bn1.weight", f"{block}.bn1.bias"):
            parameter = model.get_parameter(parameter_name)
            expected[parameter_name][indices] += lam * parameter.detach()[indices]
    regularizer.before_optimizer_step()
    for name, parameter in model.named_parameters():
        assert torch.allclose(parameter.grad, expected[name], atol=1e-6), name
    model.to(memory_format=torch.contiguous_format)
    model.zero_grad(set_to_none=True)


def test_at_lambda_zero_the_terms_are_exact_zeros_not_skipped(resnet56_tpp):
    """A captured step has the same operations at every step: λ = 0 contributes zeros instead of nothing."""
    model, pruned, regularizer = resnet56_tpp
    regularizer.iteration = 0
    assert regularizer.current_lambda == 0
    loss = regularizer.extra_loss()
    assert loss is not None and loss.item() == 0
    loss.backward()
    before = {name: parameter.grad.clone() for name, parameter in model.named_parameters()
              if parameter.grad is not None}
    assert before and all(grad.abs().max() == 0 for grad in before.values())
    regularizer.before_optimizer_step()
    assert all(torch.equal(model.get_parameter(name).grad, grad) for name, grad in before.items())
    model.zero_grad(set_to_none=True)


def test_resume_restores_the_schedule_step_and_the_lambda_the_step_reads():
    torch.manual_seed(0)
    model = ShuffledRegistration()
    config = RegularizerConfig(alpha=0.0, delta=0.25, interval=2, max_lambda=1.0, stabilize_steps=3)
    first = TPPRegularizer(model, {"conv_a": torch.tensor([1])}, torch.zeros(1, 1, 6, 6), config)
    for _ in range(5):
        first.after_optimizer_step()
    restored = TPPRegularizer(model, {"conv_a": torch.tensor([1])}, torch.zeros(1, 1, 6, 6), config)
    restored.load_state_dict(first.state_dict())
    assert restored.iteration == 5 and restored.current_lambda == 0.5 and not restored.finished()
    model.conv_a.weight.grad = torch.zeros_like(model.conv_a.weight)
    restored.before_optimizer_step()
    assert torch.equal(model.conv_a.weight.grad[1], 0.5 * model.conv_a.weight.detach()[1])
    assert model.conv_a.weight.grad[0].abs().max() == 0


@pytest.mark.parametrize("ratio, filters, round_to, expected_kept", [
    (0.9, 64, 1, 6), (0.9, 64, 8, 8), (0.9, 16, 8, 8), (0.5, 64, 8, 32), (0.6, 64, 8, 32), (0.99, 16, 32, 16),
    (0.995, 200, 8, 8), (0.3, 10, 4, 8)])
def test_round_to_rounds_the_kept_count_up_to_a_multiple_never_above_n(ratio, filters, round_to, expected_kept):
    kept = filters - pruned_count(ratio, filters, round_to)
    assert kept == expected_kept
    assert 1 <= kept <= filters and kept >= filters - pruned_count(ratio, filters)


def test_every_method_gets_the_same_aligned_selection_and_the_real_ratio_is_reported():
    from pipeline.pruning.selection import pruning_summary
    model = create_model("resnet56", 10, in_channels=1, image_size=8)
    example = torch.zeros(1, 1, 8, 8)
    exact = select_filters(model, {"*layer*.conv1": 0.9}, example_inputs=example)
    aligned = select_filters(model, {"*layer*.conv1": 0.9}, example_inputs=example, round_to=8)
    summary = pruning_summary(model, aligned)
    assert {row["kept"] for row in summary.values()} == {8}
    assert summary["layer3.0.conv1"] == {"filters": 64, "pruned": 56, "kept": 8, "ratio": 56 / 64}
    assert summary["layer1.0.conv1"]["ratio"] == 0.5
    for name, indices in aligned.items():
        assert set(indices.tolist()) <= set(exact[name].tolist())
    with pytest.raises(PruningError, match="round_to"):
        select_filters(model, {"*layer*.conv1": 0.9}, round_to=0)


def test_a_layer_type_the_graph_cannot_shrink_is_refused_naming_it():
    class Mixer(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.eye(channels))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.einsum("bchw,cd->bdhw", x, self.weight)

    model = nn.Sequential(nn.Conv2d(3, 8, 3), Mixer(8), nn.Conv2d(8, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2))
    with pytest.raises(PruningError, match=r"Layer '0' cannot be pruned.*'1.weight'.*Mixer"):
        select_filters(model, {"0": 0.5}, example_inputs=torch.zeros(1, 3, 8, 8))
