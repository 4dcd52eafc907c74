"""Coverage matrix over CNN families (torchvision and timm, 32x32 on the CPU): for each model, `plan
--suggest`'s patterns → plan → a few TPP steps → removal → output equal to the masked dense network → ONNX export. Every model
either prunes correctly or is refused with a message naming one of its layers, never a traceback. The README's
matrix lists the outcome per model. All but one are slow (seconds to a minute each on a loaded CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import RegularizerConfig
from pipeline.errors import PruningError
from pipeline.measure.export import export_onnx, onnx_max_abs_diff
from pipeline.models import create_model
from pipeline.plan import make_plan, suggest, trial_removal
from pipeline.pruning.regularizer import TPPRegularizer
from pipeline.pruning.selection import select_filters

X = torch.zeros(1, 3, 32, 32)
PRUNES = "prunes"
REFUSED = "refused"
MATRIX = {
    "torchvision/mobilenet_v3_small": PRUNES,
    "torchvision/resnet18": PRUNES, "torchvision/resnet50": PRUNES, "torchvision/vgg16_bn": PRUNES,
    "torchvision/mobilenet_v2": PRUNES, "torchvision/efficientnet_b0": PRUNES, "torchvision/convnext_tiny": PRUNES,
    "torchvision/densenet121": PRUNES, "torchvision/googlenet": PRUNES, "torchvision/squeezenet1_1": PRUNES,
    "torchvision/shufflenet_v2_x0_5": REFUSED, "torchvision/regnet_y_400mf": PRUNES,
    "torchvision/resnext50_32x4d": REFUSED,
    "timm/resnet18": PRUNES, "timm/resnet50d": PRUNES, "timm/efficientnet_b0": PRUNES,
    "timm/tf_efficientnet_b0": PRUNES, "timm/mobilenetv3_small_050": PRUNES, "timm/convnext_atto": PRUNES,
    "timm/densenet121": PRUNES, "timm/dla34": PRUNES, "timm/ese_vovnet19b_dw": PRUNES,
    "timm/cspresnet50": REFUSED, "timm/res2net50_14w_8s": REFUSED, "timm/dpn48b": REFUSED,
}
FAST = {"torchvision/mobilenet_v3_small"}
# GoogLeNet's auxiliary classifiers make its training forward return a tuple, which no classification loss takes:
# a user prunes it with `model.options: {aux_logits: false}`.
OPTIONS = {"torchvision/googlenet": {"aux_logits": False}}


def _outcome(spec: str, tmp_path: Path) -> str:
    """Run the whole chain; return PRUNES, or REFUSED after checking the refusal names a layer of the model."""
    torch.manual_seed(0)
    model = create_model(spec, 10, in_channels=3, image_size=32, **OPTIONS.get(spec, {})).eval()
    names = [name for name, _ in model.named_modules() if name]
    try:
        rows = suggest(model, X)
        patterns = sorted({str(row["pattern"]) for row in rows if row["kind"] == "prunable" and row["pattern"]})
        refused = [str(row["layer"]) for row in rows if str(row["kind"]).startswith("refused")]
        plan = make_plan(model, X, {pattern: 0.5 for pattern in patterns or refused[:1]})
    except PruningError as error:
        assert any(f"'{name}'" in str(error) for name in names) or "could not trace" in str(error), str(error)
        return REFUSED
    assert plan.layers and plan.params_after < plan.params_before and plan.max_abs_diff < 1e-3
    ratios = {pattern: 0.5 for pattern in patterns}
    selection = select_filters(model, ratios, example_inputs=X)
    _tpp_steps(model, selection)
    pruned, difference = trial_removal(model.eval(), selection, X)
    assert sum(p.numel() for p in pruned.parameters()) == plan.params_after
    path = export_onnx(pruned, X, tmp_path / "pruned.onnx")
    inputs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        scale = float(pruned(inputs).abs().max())
    assert onnx_max_abs_diff(path, pruned, inputs) <= 1e-4 * (1 + scale)   # float32, summed in another order
    return PRUNES


def _tpp_steps(model: torch.nn.Module, selection: dict) -> None:
    """Three TPP steps with a strong penalty, so the removal check runs on weights TPP has moved."""
    model.train()
    tpp = TPPRegularizer(model, selection, X, RegularizerConfig(delta=0.5, interval=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        inputs, targets = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        extra = tpp.extra_loss()
        (loss + extra if extra is not None else loss).backward()
        tpp.before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad()
        tpp.after_optimizer_step()
    model.eval()


@pytest.mark.parametrize("spec", [pytest.param(spec, marks=() if spec in FAST else pytest.mark.slow)
                                  for spec in MATRIX])
def test_model_prunes_correctly_or_is_refused_naming_a_layer(spec: str, tmp_path: Path) -> None:
    assert _outcome(spec, tmp_path) == MATRIX[spec]
