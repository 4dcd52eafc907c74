"""`plan`: exact figures from a trial removal, and a refusal naming the layer for every construct the dependency
graph cannot prune (tiny user networks from nets_fixture, at 3x16x16)."""

from __future__ import annotations

import pytest
import torch

import nets_fixture
from pipeline.errors import PruningError
from pipeline.measure.cost import count_macs, count_parameters
from pipeline.models import create_model
from pipeline.plan import make_plan, suggest
from pipeline.plan.cli import main
from pipeline.pruning.selection import select_filters
from pipeline.pruning.surgery import remove_filters

X = torch.zeros(1, 3, 16, 16)


def test_plan_figures_equal_the_real_removal_and_leave_the_model_untouched() -> None:
    model = create_model("resnet20", 10, in_channels=3, image_size=16, shortcut="B").eval()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    plan = make_plan(model, X, {"*layer*.conv1": 0.5})
    pruned = remove_filters(create_model("resnet20", 10, in_channels=3, image_size=16, shortcut="B").eval(),
                            select_filters(model, {"*layer*.conv1": 0.5}, example_inputs=X), X)
    assert (plan.params_after, plan.macs_after) == (count_parameters(pruned), count_macs(pruned, X))
    assert plan.params_before == count_parameters(model) and plan.params_after < plan.params_before
    assert [layer.kept for layer in plan.layers] == [8] * 3 + [16] * 3 + [32] * 3
    assert "layer1.0.bn1 (BN)" in plan.layers[0].removed_with
    assert "layer1.0.conv2 (inputs)" in plan.layers[0].removed_with
    assert plan.max_abs_diff < 1e-4
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_round_to_is_reported_as_requested_versus_actual() -> None:
    plan = make_plan(nets_fixture.make_net(10, width=16), X, {"b": 0.9}, round_to=8)
    layer = plan.layers[0]
    assert (layer.filters, layer.pruned, layer.kept, layer.requested, layer.actual) == (32, 24, 8, 0.9, 0.75)
    assert "differs from the requested 0.90" in layer.warnings[0]


@pytest.mark.parametrize("net", [nets_fixture.SpatialPad, nets_fixture.SigmoidGate, nets_fixture.SyncBN])
def test_constructs_that_prune_exactly(net: type) -> None:
    plan = make_plan(net(10), X, {"a": 0.5})
    assert plan.layers[0].kept == 4 and plan.max_abs_diff < 1e-4
    assert "bn_a (BN)" in plan.layers[0].removed_with or net is nets_fixture.SigmoidGate


@pytest.mark.parametrize(("net", "pattern", "fragments"), [
    (nets_fixture.StaticSplit, "a", ["'a'", "forward pass fails", "prune.skip"]),
    (nets_fixture.StaticSlice, "a", ["'a'", "forward pass fails"]),
    (nets_fixture.Flip, "a", ["'a'", "changes what the network computes"]),
    (nets_fixture.ChannelShuffle, "a", ["'a'", "changes what the network computes"]),
    (nets_fixture.GroupNormNet, "a", ["'a'", "GroupNorm", "4 groups over 8 channels"]),
    (nets_fixture.DepthMultiplier, "a", ["'a'", "grouped Conv2d", "'b'"]),
    (nets_fixture.Reused, "b2", ["'b2' is called 2 times"]),
    (nets_fixture.Unused, "aux", ["'aux' is never called"]),
    (nets_fixture.Plain, "out", ["'out' produces the network's output"]),
    (nets_fixture.Plain, "c*", ["'c*' matches no Conv2d/Linear"]),
])
def test_unprunable_constructs_are_refused_naming_the_layer(net: type, pattern: str, fragments: list) -> None:
    with pytest.raises(PruningError) as caught:
        make_plan(net(10), X, {pattern: 0.5})
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_skip_covering_every_matched_layer_is_refused() -> None:
    with pytest.raises(PruningError, match="covers every layer"):
        make_plan(nets_fixture.make_net(10), X, {"*": 0.5}, skip=["a", "b", "out"])


def test_a_tracer_crash_becomes_a_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.pruning.selection as selection

    def crash(*args: object, **kwargs: object) -> None:
        raise IndexError("index 12 is out of bounds")
    monkeypatch.setattr(selection, "build_graph", crash)
    with pytest.raises(PruningError, match="could not trace this model.*index 12"):
        make_plan(nets_fixture.make_net(10), X, {"a": 0.5})


def test_suggest_marks_head_stem_and_coupled_layers() -> None:
    model = create_model("torchvision/resnet18", 10, in_channels=3, image_size=32)
    rows = {row["layer"]: row for row in suggest(model, torch.zeros(1, 3, 32, 32))}
    assert rows["fc"]["kind"].startswith("head")
    assert rows["conv1"]["kind"].startswith("coupled")
    assert rows["layer1.0.conv2"]["kind"].startswith("coupled") and rows["layer1.0.conv2"]["pattern"] == ""
    assert rows["layer1.0.conv1"]["kind"] == "prunable" and rows["layer1.0.conv1"]["pattern"] == "layer1.*.conv1"


def test_cli_prints_json(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import pipeline.plan.cli as plan_module
    monkeypatch.setattr(plan_module, "_architecture", lambda config: ("resnet20", 10, (1, 8, 8)))
    main(["--json", "model.name=resnet20", "prune.ratio=0.5"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"] == "resnet20" and len(printed["layers"]) == 9


def test_cli_prints_the_table_with_each_layers_cost(capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.plan.cli as plan_module
    monkeypatch.setattr(plan_module, "_architecture", lambda config: ("resnet20", 10, (1, 8, 8)))
    main(["model.name=resnet20", "prune.ratio=0.5"])
    printed = capsys.readouterr().out
    row = next(line for line in printed.splitlines() if "layer1.0.conv1 " in line)
    assert "2.3k -> 1.15k" in row and "147k -> 73.7k" in row, row   # 16·16·9 weights at 8×8, half the filters
    assert "MACs" in printed and "x fewer" in printed


def test_cli_prints_the_suggestions(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.plan.cli as plan_module
    monkeypatch.setattr(plan_module, "_architecture", lambda config: ("resnet20", 10, (1, 8, 8)))
    main(["--suggest", "model.name=resnet20"])
    printed = capsys.readouterr().out
    assert 'prune.layers: ["layer1.*.conv1", "layer2.*.conv1", "layer3.*.conv1"]' in printed


def test_each_layers_cost_adds_up_to_the_totals() -> None:
    """A layer's own parameters and MACs before and after removal, from the trial removal itself."""
    model = create_model("resnet20", 10, in_channels=3, image_size=32)
    plan = make_plan(model, torch.zeros(1, 3, 32, 32), {"layer*.conv1": 0.5})
    first = next(layer for layer in plan.layers if layer.name == "layer1.0.conv1")
    assert (first.params_before, first.params_after) == (16 * 16 * 9, 8 * 16 * 9)
    assert (first.macs_before, first.macs_after) == (16 * 16 * 9 * 32 * 32, 8 * 16 * 9 * 32 * 32)
    own_saving = sum(layer.params_before - layer.params_after for layer in plan.layers)
    assert 0 < own_saving < plan.params_before - plan.params_after   # the next convs' inputs and BNs go too


def test_a_reordering_is_refused_even_when_the_random_choice_of_filters_hides_it() -> None:
    """Reversing 8 channels maps the mirror-symmetric choice {0, 1, 6, 7} onto itself, so removing exactly those
    is exact by chance (about 1 random choice in 12 is symmetric); the trained network would choose others. The
    second choice of filters that the trial removal checks catches it."""
    from pipeline.plan import trial_removal
    from pipeline.plan.removal import _remove_and_compare
    torch.manual_seed(0)
    model = nets_fixture.Flip(10).eval()
    symmetric = {"a": torch.tensor([0, 1, 6, 7])}
    _, diff, _ = _remove_and_compare(model, symmetric, X)
    assert diff < 1e-5, "the symmetric choice alone cannot see the reversal"
    with pytest.raises(PruningError, match="'a' changes what the network computes"):
        trial_removal(model, symmetric, X)
