"""Which filters TPP (and every baseline) prunes: chosen once, from the dense weights, by the paper's rule.

Score of a filter = mean |w| over its inputs and kernel; per layer n = min(ceil(r*N), floor(0.995*N)) smallest
scores are pruned; the ratio r of a layer comes from fnmatch patterns on module names (last match wins).
"""

from __future__ import annotations

import math
from fnmatch import fnmatch
from typing import Dict, Mapping, Optional, Sequence

import torch
from torch import nn

from pipeline.errors import PruningError
from pipeline.pruning.surgery import build_graph, check_removable, prunable_layers

MAX_LAYER_FRACTION = 0.995


def pruned_count(ratio: float, filters: int) -> int:
    """Filters to prune: min(ceil(r·N), floor(0.995·N)), so a layer is never emptied.

    r·N is rounded to 6 decimals first so float noise (0.7·10 = 7.000000000000001) does not add a filter.
    """
    return min(math.ceil(round(ratio * filters, 6)), math.floor(MAX_LAYER_FRACTION * filters))


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
                   example_inputs: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Choose, once and from the dense weights, the output filters each matched layer loses.

    Returns layer name → sorted indices of pruned filters (smallest scores first chosen). With `example_inputs`
    the choice is also checked against the dependency graph (residual streams it cannot handle are refused).
    """
    layers = prunable_layers(model)
    _check_patterns(layers, ratios, skip)
    pruned = {}
    for name, ratio in layer_ratios(list(layers), ratios, skip).items():
        weight = layers[name].weight
        count = pruned_count(ratio, weight.shape[0]) if ratio > 0 else 0
        if count > 0:
            order = torch.argsort(filter_scores(weight), stable=True)
            pruned[name] = torch.sort(order[:count]).values.cpu()
    if example_inputs is not None:
        check_removable(build_graph(model, example_inputs), model, pruned)
    return pruned


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


def pruning_summary(model: nn.Module, pruned: Mapping[str, torch.Tensor]) -> Dict[str, Dict[str, float]]:
    """Per pruned layer: filters before, filters pruned and the real ratio |P|/N."""
    layers = prunable_layers(model)
    return {name: {"filters": layers[name].weight.shape[0], "pruned": len(indices),
                   "ratio": len(indices) / layers[name].weight.shape[0]} for name, indices in pruned.items()}
