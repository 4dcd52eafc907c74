"""`plan --suggest`: every Conv/Linear layer of a model classified (head, stem, coupled stream, refused, prunable),
with ready-to-paste patterns that match only prunable, independent layers."""

from __future__ import annotations

import re
from fnmatch import fnmatch
from typing import Dict, List, Sequence

import torch
import torch_pruning as tp
from torch import nn

from pipeline.errors import PruningError
from pipeline.plan.removal import first_line
from pipeline.pruning.selection import check_understood
from pipeline.pruning.surgery import build_graph, check_removable, group_members, prunable_layers, pruning_group


def suggest(model: nn.Module, example_inputs: torch.Tensor) -> List[Dict[str, object]]:
    """Every Conv/Linear layer classified (head, stem, coupled stream, refused, prunable), and ready-to-paste
    patterns that match only prunable, independent layers."""
    model = model.eval()
    try:
        graph = build_graph(model, example_inputs)
    except Exception as error:
        raise PruningError(f"The dependency graph (Torch-Pruning {tp.__version__}) could not trace this model: "
                           f"{type(error).__name__}: {first_line(error)}. Known for channel-shuffle and "
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
