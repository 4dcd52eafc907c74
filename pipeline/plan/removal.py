"""The plan's figures: which filters each pattern selects, what goes with them, and a trial removal on a copy that
must compute what the dense network computes with those channels masked, so that the parameter and MAC figures are
exact and a model the dependency graph misreads is refused before any training, with the layer named. Counts depend
only on how many filters go, not which, so a random-weight model gives the same figures as the trained one."""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from typing import Dict, List, Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn

from pipeline.errors import PipelineError, PruningError
from pipeline.measure.cost import count_macs, count_parameters, count_per_module
from pipeline.pruning.selection import select_filters
from pipeline.pruning.surgery import build_graph, consumer_inputs, group_members, mask_inputs, remove_filters

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
    masked, for this choice of filters and for another (`_other_choice`); on failure, try the layers one by one to
    name the one at fault. Returns the copy with `selection` removed and the largest output difference seen."""
    try:
        pruned, diff, scale = _remove_and_compare(model, selection, example_inputs)
        for other in _other_choice(selection):
            _, other_diff, other_scale = _remove_and_compare(model, other, example_inputs)
            if other_diff / (1 + other_scale) > diff / (1 + scale):
                diff, scale = other_diff, other_scale
    except PruningError:
        raise
    except Exception as error:
        culprit = _culprit(model, selection, example_inputs)
        raise PruningError(
            f"After removing the filters of '{culprit}' (on a copy), the forward pass fails: "
            f"{first_line(error)}. The model stores a channel count as a Python number (split sizes, slices, view "
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


def _other_choice(selection: Mapping[str, torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
    """The same counts taken as each layer's first filters, unless that is the selection itself.

    The trained network will choose other filters than the random-weight one checked here, and a model that
    reorders channels can map one choice onto itself: a channel reversal maps a mirror-symmetric set of filters
    onto itself, and removal is then exact by chance. A second, different choice catches what the first missed."""
    first = {name: torch.arange(len(indices)) for name, indices in selection.items()}
    same = all(torch.equal(torch.sort(selection[name]).values.cpu(), first[name]) for name in selection)
    return [] if same else [first]


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
            f"layers: {first_line(error)}. Known for concat/split-heavy networks (CSPNet, DPN, Res2Net, HRNet). "
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
    """The first selected layer whose removal alone, of its selected or of its first filters, breaks the forward
    or changes the output."""
    for name, indices in selection.items():
        for choice in ({name: indices}, *_other_choice({name: indices})):
            try:
                _, diff, scale = _remove_and_compare(model, choice, example_inputs)
            except Exception:
                return name
            if diff > TOLERANCE * (1 + scale):
                return name
    return next(iter(selection))


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
