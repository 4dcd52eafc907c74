"""`plan`: what the prune stage will do to a model, worked out in seconds on the CPU before any training.

For the settings in params.yaml (or `key=value` overrides) it resolves the layer patterns, chooses the filter
counts (after `round_to`), lists what disappears with each layer (its BatchNorm, coupled layers, the next layers'
inputs), and removes the filters for real on a copy. The copy's output must equal the dense network's with those
channels masked at every consumer's input, so the parameter and MAC figures are exact and a model the dependency
graph misreads (static split sizes, channel shuffles, stored widths) is refused before pretraining, with the layer
named. Counts depend only on how many filters go, not which, so a random-weight model gives the same figures as
the trained one.

    python -m pipeline.plan [--json] [--suggest] [key=value ...]      (make plan)

One module (~340 lines) on purpose: the per-layer plan, the trial removal that makes its figures exact and the
two views of them (table, --suggest) read the same dependency-graph groups.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import warnings
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch_pruning as tp
from torch import nn

from pipeline.config import Config
from pipeline.errors import PipelineError, PruningError
from pipeline.measure.cost import count_macs, count_parameters, count_per_module
from pipeline.models import create_model, model_spec
from pipeline.pruning.selection import check_understood, select_filters
from pipeline.settings import load_settings
from pipeline.stage import reported_errors
from pipeline.pruning.surgery import (build_graph, check_removable, consumer_inputs, group_members, mask_inputs,
                                      prunable_layers, pruning_group, remove_filters)

# Relative tolerance of the removal-versus-masked-network check: float32 sums taken in another order differ by
# ~1e-6; a misread channel moves outputs by far more.
TOLERANCE = 1e-4
# A layer whose actual ratio differs from the requested one by more than this gets a warning (round_to at work).
RATIO_DRIFT = 0.05


@dataclass
class LayerPlan:
    """One pruned layer: which pattern chose it, the counts, and what goes with it."""

    name: str
    pattern: str
    filters: int
    pruned: int
    kept: int
    requested: float
    actual: float
    removed_with: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    macs_before: int = 0
    macs_after: int = 0


@dataclass
class Plan:
    """The whole prune stage in figures: per layer, totals before/after, and the equivalence check."""

    model: str
    input_shape: List[int]
    layers: List[LayerPlan]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    max_abs_diff: float
    warnings: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)


def make_plan(model: nn.Module, example_inputs: torch.Tensor, ratios: Mapping[str, float],
              skip: Sequence[str] = (), round_to: int = 1, spec: str = "") -> Plan:
    """Select, check, remove on a copy and compare: a `PruningError` naming the layer if anything does not hold."""
    model = model.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        selection = _select(model, example_inputs, ratios, skip, round_to)
        graph = build_graph(model, example_inputs)
    pruned, max_diff = trial_removal(model, selection, example_inputs)
    costs = (count_per_module(model, example_inputs), count_per_module(pruned, example_inputs))
    layers = [_layer_plan(graph, model, name, indices, ratios, skip, costs) for name, indices in selection.items()]
    notes = sorted({" ".join(str(w.message).split()) for w in caught if issubclass(w.category, UserWarning)})
    return Plan(spec, list(example_inputs.shape[1:]), layers, count_parameters(model), count_parameters(pruned),
                count_macs(model, example_inputs), count_macs(pruned, example_inputs), max_diff, notes)


def check_prunable(model: nn.Module, example_inputs: torch.Tensor, ratios: Mapping[str, float],
                   skip: Sequence[str] = (), round_to: int = 1) -> None:
    """The structural half of `make_plan`, for validate: patterns, graph checks and the trial removal."""
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trial_removal(model, _select(model, example_inputs, ratios, skip, round_to), example_inputs)


def trial_removal(model: nn.Module, selection: Mapping[str, torch.Tensor],
                  example_inputs: torch.Tensor) -> tuple[nn.Module, float]:
    """Remove `selection` from a copy and check it computes what the dense model computes with those channels
    masked; on failure, try the layers one by one to name the one at fault."""
    try:
        pruned, diff, scale = _remove_and_compare(model, selection, example_inputs)
    except PruningError:
        raise
    except Exception as error:
        culprit = _culprit(model, selection, example_inputs)
        raise PruningError(
            f"After removing the filters of '{culprit}' (on a copy), the forward pass fails: "
            f"{_first_line(error)}. The model stores a channel count as a Python number (split sizes, slices, view "
            f"shapes) that removal cannot update. Add '{culprit}' to prune.skip, or compute such sizes from the "
            f"tensor (`x.shape[1]`) in the model's code.") from None
    if diff > TOLERANCE * (1 + scale):
        culprit = _culprit(model, selection, example_inputs)
        raise PruningError(
            f"Removing the filters of '{culprit}' changes what the network computes (max output difference "
            f"{diff:.3g} against the dense network with those channels masked): a channel shuffle, a slice or a "
            f"reshape uses stored widths or channel order, which the dependency graph cannot follow. Add "
            f"'{culprit}' to prune.skip, or prune another layer (`python -m pipeline.plan --suggest`).")
    return pruned, diff


def suggest(model: nn.Module, example_inputs: torch.Tensor) -> List[Dict[str, object]]:
    """Every Conv/Linear layer classified (head, stem, coupled stream, refused, prunable), and ready-to-paste
    patterns that match only prunable, independent layers."""
    model = model.eval()
    try:
        graph = build_graph(model, example_inputs)
    except Exception as error:
        raise PruningError(f"The dependency graph (Torch-Pruning {tp.__version__}) could not trace this model: "
                           f"{type(error).__name__}: {_first_line(error)}. Known for channel-shuffle and "
                           f"split-heavy networks (ShuffleNet, CSPNet, DPN, Res2Net); this model cannot be pruned "
                           f"by the pipeline as it is.") from None
    layers = prunable_layers(model)
    order = _call_order(model, example_inputs, list(layers))
    rows = []
    for name, module in layers.items():
        rows.append({"layer": name, "filters": module.weight.shape[0],
                     "kind": _kind(graph, model, name, module, order)})
    prunable = [row["layer"] for row in rows if row["kind"] in ("prunable", "stem")]
    patterns: Dict[str, List[str]] = {}
    for name in prunable:
        pattern = re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", name)
        if all(other in prunable for other in layers if fnmatch(other, pattern)):
            patterns.setdefault(pattern, []).append(name)
        else:
            patterns.setdefault(name, []).append(name)
    for row in rows:
        row["pattern"] = next((p for p, names in patterns.items() if row["layer"] in names), "")
    return rows


def plan_for_config(config: Config) -> Plan:
    """The plan of params.yaml's settings: the model built with random weights at the dataset's input shape."""
    spec, num_classes, shape = _architecture(config)
    model = create_model(spec, num_classes, in_channels=shape[0], image_size=shape[-1], **config.model.options)
    return make_plan(model, torch.zeros(1, *shape), config.layer_ratios(), config.prune.skip,
                     config.prune.round_to, spec)


def _architecture(config: Config) -> tuple[str, int, tuple[int, int, int]]:
    from pipeline.data import build_loaders
    info = build_loaders(config.data, batch_size=1, seed=config.seed, device=torch.device("cpu"))[2]
    return model_spec(config.model.name, config.model.factory), info.num_classes, info.input_shape


def _select(model: nn.Module, example_inputs: torch.Tensor, ratios: Mapping[str, float], skip: Sequence[str],
            round_to: int) -> Dict[str, torch.Tensor]:
    """select_filters with the graph checks; a tracer crash becomes a refusal naming the library."""
    try:
        return select_filters(model, ratios, skip, example_inputs=example_inputs, round_to=round_to)
    except PipelineError:
        raise
    except Exception as error:
        raise PruningError(
            f"The dependency graph (Torch-Pruning {tp.__version__}) could not trace this model for the selected "
            f"layers: {_first_line(error)}. Known for concat/split-heavy networks (CSPNet, DPN, Res2Net, HRNet). "
            f"Prune fewer layers (see `python -m pipeline.plan --suggest`), or report it upstream.") from None


def _layer_plan(graph: tp.DependencyGraph, model: nn.Module, name: str, indices: torch.Tensor,
                ratios: Mapping[str, float], skip: Sequence[str],
                costs: tuple[Dict[str, tuple[int, int]], Dict[str, tuple[int, int]]]) -> LayerPlan:
    """One layer's row; its parameters and MACs are its own, before and after the trial removal (the after
    figures also count inputs an earlier pruned layer took away)."""
    module = model.get_submodule(name)
    matching = [pattern for pattern in ratios if fnmatch(name, pattern)]
    filters, count = module.weight.shape[0], len(indices)
    members = [f"{m.name} (outputs)" if isinstance(m.module, (nn.Conv2d, nn.Linear)) else f"{m.name} (BN)"
               for m in group_members(graph, module, indices.tolist()) if m.name != name]
    members += [f"{m.name} (inputs)" for m in consumer_inputs(graph, module, indices.tolist())]
    requested = ratios[matching[-1]]
    notes = []
    if abs(count / filters - requested) > RATIO_DRIFT:
        notes.append(f"actual ratio {count / filters:.2f} differs from the requested {requested:.2f} "
                     f"(rounding to whole filters, prune.round_to, or the 99.5% cap)")
    if len(matching) > 1:
        notes.append(f"also matched by {matching[:-1]}; the last pattern wins")
    (params_before, macs_before), (params_after, macs_after) = costs[0][name], costs[1][name]
    return LayerPlan(name, matching[-1], filters, count, filters - count, requested, count / filters,
                     members, notes, params_before, params_after, macs_before, macs_after)


def _remove_and_compare(model: nn.Module, selection: Mapping[str, torch.Tensor],
                        example_inputs: torch.Tensor) -> tuple[nn.Module, float, float]:
    probe = torch.randn(example_inputs.shape, generator=torch.Generator().manual_seed(0))
    masked = copy.deepcopy(model).eval()
    graph = build_graph(masked, example_inputs)
    for name, indices in selection.items():
        mask_inputs(consumer_inputs(graph, masked.get_submodule(name), indices.tolist()))
    pruned = remove_filters(copy.deepcopy(model).eval(), selection, example_inputs)
    with torch.no_grad():
        reference, output = masked(probe), pruned(probe)
    return pruned, float((output - reference).abs().max()), float(reference.abs().max())


def _culprit(model: nn.Module, selection: Mapping[str, torch.Tensor], example_inputs: torch.Tensor) -> str:
    """The first selected layer whose removal alone breaks the forward or changes the output."""
    for name, indices in selection.items():
        try:
            _, diff, scale = _remove_and_compare(model, {name: indices}, example_inputs)
        except Exception:
            return name
        if diff > TOLERANCE * (1 + scale):
            return name
    return next(iter(selection))


def _call_order(model: nn.Module, example_inputs: torch.Tensor, names: Sequence[str]) -> Dict[str, int]:
    """Layer name -> position of its first call in the forward pass."""
    order: List[str] = []
    handles = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: order.append(n)) for n in names]
    try:
        with torch.no_grad():
            model(example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: position for position, name in reversed(list(enumerate(order)))}


def _kind(graph: tp.DependencyGraph, model: nn.Module, name: str, module: nn.Module, order: Dict[str, int]) -> str:
    """How a layer may be pruned on its own: head / unused / coupled with ... / refused: ... / stem / prunable.

    'Coupled' means its output channels are tied to other layers': through a residual addition (a stream whose
    filters no single layer owns), or as the gate of an earlier layer (an SE block's expand conv, which goes with
    the layer it gates). The earlier layer of a gated pair stays prunable and takes the gate along."""
    if module not in graph.module2node:
        return "unused (never called)"
    if not graph.module2node[module].outputs or order.get(name, -1) == max(order.values(), default=-1):
        return "head (network output)"
    selection = {name: torch.tensor([0])}
    group = pruning_group(graph, module, [0])
    residual = any(item.dep.target.grad_fn is not None and "Add" in item.dep.target.grad_fn.name()
                   for item in group)
    coupled = sorted(m.name for m in group_members(graph, module, [0])
                     if m.name != name and isinstance(m.module, (nn.Conv2d, nn.Linear)) and not _depthwise(m.module))
    try:
        check_removable(graph, model, selection)
        check_understood(graph, model, selection)
    except PruningError as error:
        return f"refused: {str(error).split(':')[0] if ':' in str(error)[:80] else str(error)[:100]}"
    if coupled and (residual or any(order.get(other, 0) < order.get(name, 0) for other in coupled)):
        return f"coupled with {', '.join(coupled[:3])}{', ...' if len(coupled) > 3 else ''}"
    return "stem" if order.get(name) == 0 else "prunable"


def _depthwise(module: nn.Module) -> bool:
    """A depthwise conv follows its input's channels one to one: it shrinks with them, coupling nothing."""
    return isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels > 1


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def print_plan(plan: Plan) -> None:
    """The plan as a rich table plus totals and warnings."""
    from rich.table import Table
    console = _console()
    table = Table(title=f"plan: {plan.model} at input {tuple(plan.input_shape)}", show_lines=False)
    numeric = ("filters", "pruned", "kept", "requested", "actual", "params", "MACs")
    for column in ("layer", "pattern", *numeric, "removed with"):
        table.add_column(column, justify="right" if column in numeric else "left")
    for layer in plan.layers:
        table.add_row(layer.name, layer.pattern, str(layer.filters), str(layer.pruned), str(layer.kept),
                      f"{layer.requested:.2f}", f"{layer.actual:.2f}",
                      f"{_short(layer.params_before)} -> {_short(layer.params_after)}",
                      f"{_short(layer.macs_before)} -> {_short(layer.macs_after)}", ", ".join(layer.removed_with))
    console.print(table)
    console.print(f"params {plan.params_before:,} -> {plan.params_after:,} "
                  f"({plan.params_after / plan.params_before:.1%}); MACs {plan.macs_before:,} -> "
                  f"{plan.macs_after:,} ({plan.macs_before / max(plan.macs_after, 1):.2f}x fewer); removal checked "
                  f"against the masked dense network: max |diff| {plan.max_abs_diff:.2g}", markup=False)
    for layer in plan.layers:
        for note in layer.warnings:
            console.print(f"warning: {layer.name}: {note}", markup=False)
    for note in plan.warnings:
        console.print(f"warning: {note}", markup=False)


def _console():
    """Rich's console, wide enough for the table when the output is piped (rich assumes 80 columns then)."""
    from rich.console import Console
    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=200)


def _short(count: int) -> str:
    """12,345,678 -> '12.3M': a table column that stays narrow."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= size:
            return f"{count / size:.3g}{suffix}"
    return str(count)


def print_suggestions(rows: List[Dict[str, object]]) -> None:
    from rich.table import Table
    console = _console()
    table = Table(title="prunable layer groups (paste a pattern into prune.layers)")
    for column in ("layer", "filters", "kind", "pattern"):
        table.add_column(column)
    for row in rows:
        table.add_row(str(row["layer"]), str(row["filters"]), str(row["kind"]), str(row["pattern"]))
    console.print(table)
    patterns = sorted({str(row["pattern"]) for row in rows if row["pattern"]})
    console.print(f"prune.layers: {json.dumps(patterns)}", markup=False)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (for scripts)")
    parser.add_argument("--suggest", action="store_true", help="list the model's prunable layers and patterns")
    parser.add_argument("overrides", nargs="*", help="settings overrides such as prune.ratio=0.5")
    arguments = parser.parse_args(argv)
    with reported_errors():
        config = load_settings(arguments.overrides)
        if arguments.suggest:
            spec, num_classes, shape = _architecture(config)
            model = create_model(spec, num_classes, in_channels=shape[0], image_size=shape[-1],
                                 **config.model.options)
            rows = suggest(model, torch.zeros(1, *shape))
            print(json.dumps(rows, indent=2)) if arguments.json else print_suggestions(rows)
            return
        plan = plan_for_config(config)
        print(json.dumps(plan.to_dict(), indent=2)) if arguments.json else print_plan(plan)


if __name__ == "__main__":
    main(sys.argv[1:])
