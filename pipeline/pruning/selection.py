"""Which filters TPP (and every baseline) prunes: chosen once, from the dense weights, by the paper's rule.

Score of a filter = mean |w| over its inputs and kernel; per layer n = min(ceil(r*N), floor(0.995*N)) smallest
scores are pruned; the ratio r of a layer comes from fnmatch patterns on module names (last match wins).
With `round_to` m > 1 the kept count N − n is rounded UP to a multiple of m (capped at N), inside this one rule, so
every method prunes the same hardware-aligned filters: GPU kernels are fast on channel counts that are multiples
of 8/16/32 and slow on odd ones, so an aligned network can run faster than one with fewer MACs.
"""

from __future__ import annotations

import math
from fnmatch import fnmatch
from typing import Dict, Mapping, Optional, Sequence

import torch
import torch_pruning as tp
from torch import nn

from pipeline.errors import PruningError
from pipeline.pruning.surgery import build_graph, check_called_once, check_removable, prunable_layers, pruning_group

MAX_LAYER_FRACTION = 0.995


def pruned_count(ratio: float, filters: int, round_to: int = 1) -> int:
    """Filters to prune: min(ceil(r·N), floor(0.995·N)), so a layer is never emptied; then the kept count is
    rounded up to a multiple of `round_to` (never above N), so alignment only ever keeps more filters.

    r·N is rounded to 6 decimals first so float noise (0.7·10 = 7.000000000000001) does not add a filter.
    """
    count = min(math.ceil(round(ratio * filters, 6)), math.floor(MAX_LAYER_FRACTION * filters))
    kept = min(filters, math.ceil((filters - count) / round_to) * round_to)
    return filters - kept


def filter_scores(weight: torch.Tensor) -> torch.Tensor:
    """Importance of each output filter: mean |w| over its inputs and kernel (the L1 norm's ordering)."""
    return weight.detach().abs().flatten(1).mean(dim=1)


def layer_ratios(names: Sequence[str], ratios: Mapping[str, float], skip: Sequence[str] = ()) -> Dict[str, float]:
    """Ratio of every named layer: the last matching pattern wins, skipped or unmatched layers get 0."""
    resolved = {}
    for name in names:
        matching = [ratio for pattern, ratio in ratios.items() if fnmatch(name, pattern)]
        skipped = any(fnmatch(name, pattern) for pattern in skip)
        resolved[name] = 0.0 if skipped or not matching else matching[-1]
    return resolved


def select_filters(model: nn.Module, ratios: Mapping[str, float], skip: Sequence[str] = (),
                   example_inputs: Optional[torch.Tensor] = None, round_to: int = 1) -> Dict[str, torch.Tensor]:
    """Choose, once and from the dense weights, the output filters each matched layer loses.

    Returns layer name → sorted indices of pruned filters (smallest scores first chosen). Kept counts are
    multiples of `round_to` (1: the paper's exact counts). With `example_inputs` the choice is also checked
    against the dependency graph (residual streams it cannot handle are refused).
    """
    if round_to < 1:
        raise PruningError(f"round_to is {round_to}; it is the multiple kept-filter counts are rounded up to and "
                           f"must be 1 (the paper's exact counts) or more, e.g. 8. Fix prune.round_to.")
    layers = prunable_layers(model)
    _check_patterns(layers, ratios, skip)
    pruned = {}
    for name, ratio in layer_ratios(list(layers), ratios, skip).items():
        weight = layers[name].weight
        count = pruned_count(ratio, weight.shape[0], round_to) if ratio > 0 else 0
        if count > 0:
            order = torch.argsort(filter_scores(weight), stable=True)
            pruned[name] = torch.sort(order[:count]).values.cpu()
    if example_inputs is not None:
        check_called_once(model, example_inputs, list(pruned))
        graph = build_graph(model, example_inputs)
        check_removable(graph, model, pruned)
        check_understood(graph, model, pruned)
    return pruned


def check_understood(graph: tp.DependencyGraph, model: nn.Module, pruned: Mapping[str, torch.Tensor]) -> None:
    """Refuse a removal the dependency graph cannot carry out: one reaching a grouped (not depthwise) conv, or a
    parameter of a layer type it does not know unless that is a per-channel vector (Torch-Pruning then guesses
    which dimension to cut, and a matrix guessed wrong fails, or silently computes something else, after
    removal)."""
    owners = {id(parameter): name for name, parameter in model.named_parameters()}
    modules = {id(module): module_name for module_name, module in model.named_modules()}
    for name, indices in pruned.items():
        for item in pruning_group(graph, model.get_submodule(name), indices.tolist()):
            target = item.dep.target.module
            if isinstance(target, nn.GroupNorm):
                raise PruningError(
                    f"Layer '{name}' cannot be pruned: its filters feed '{modules.get(id(target), '?')}', a GroupNorm "
                    f"({target.num_groups} groups over {target.num_channels} channels); removing channels would "
                    f"regroup them (the dependency graph does not change num_groups), so the network would compute "
                    f"something else. Add '{name}' to prune.skip, or prune layers that feed no GroupNorm.")
            if isinstance(target, nn.Conv2d) and target.groups > 1 and not (
                    target.groups == target.in_channels == target.out_channels):
                raise PruningError(
                    f"Layer '{name}' cannot be pruned: its filters feed '{modules.get(id(target), '?')}', a grouped "
                    f"Conv2d ({target.groups} groups of {target.in_channels // target.groups} channels), which the "
                    f"dependency graph (Torch-Pruning) cannot shrink channel by channel. Add '{name}' to prune.skip "
                    f"or prune layers that feed only ordinary or depthwise convs.")
            if isinstance(target, nn.Parameter) and sum(size > 1 for size in target.shape) > 1:
                owner = owners.get(id(target), "?")
                module = model.get_submodule(owner.rpartition(".")[0]) if "." in owner else model
                raise PruningError(
                    f"Layer '{name}' cannot be pruned: its filters feed '{owner}' (shape {tuple(target.shape)}) of "
                    f"the {type(module).__name__} layer, a layer type the dependency graph (Torch-Pruning) does not "
                    f"know how to shrink. Add '{name}' to prune.skip, prune layers whose outputs reach only "
                    f"Conv/Linear/BatchNorm/LayerNorm and element-wise ops, or register a Torch-Pruning pruner for "
                    f"{type(module).__name__}.")


def _check_patterns(layers: Mapping[str, nn.Module], ratios: Mapping[str, float], skip: Sequence[str]) -> None:
    """Every pattern must match a prunable layer and every ratio must be in [0, 1)."""
    examples = ", ".join(list(layers)[:8]) + (", ..." if len(layers) > 8 else "")
    for pattern, ratio in ratios.items():
        if not 0 <= ratio < 1:
            raise PruningError(f"Pruning ratio {ratio} for '{pattern}' is outside [0, 1); a ratio is the fraction of "
                               f"a layer's filters to remove and a whole layer is never removed.")
        if not any(fnmatch(name, pattern) for name in layers):
            raise PruningError(f"The layer pattern '{pattern}' matches no Conv2d/Linear layer of this model. "
                               f"Patterns are fnmatch patterns on full module names; this model has: {examples}.")
    for pattern in skip:
        if not any(fnmatch(name, pattern) for name in layers):
            raise PruningError(f"The skip pattern '{pattern}' matches no Conv2d/Linear layer of this model. "
                               f"This model has: {examples}.")
    matched = [name for name in layers if any(fnmatch(name, pattern) for pattern in ratios)]
    if matched and all(any(fnmatch(name, pattern) for pattern in skip) for name in matched):
        raise PruningError(f"prune.skip {list(skip)} covers every layer prune.layers/prune.ratios match "
                           f"({', '.join(matched[:6])}{', ...' if len(matched) > 6 else ''}), so nothing would be "
                           f"pruned and the 'pruned' network would be the dense one. Narrow prune.skip.")


def pruning_summary(model: nn.Module, pruned: Mapping[str, torch.Tensor]) -> Dict[str, Dict[str, float]]:
    """Per pruned layer: filters before, pruned and kept, and the real ratio |P|/N (which `round_to` moves away
    from the requested one)."""
    layers = prunable_layers(model)
    return {name: {"filters": layers[name].weight.shape[0], "pruned": len(indices),
                   "kept": layers[name].weight.shape[0] - len(indices),
                   "ratio": len(indices) / layers[name].weight.shape[0]} for name, indices in pruned.items()}
