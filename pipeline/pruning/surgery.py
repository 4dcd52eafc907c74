"""Dependency analysis and physical filter removal, delegated to Torch-Pruning's DependencyGraph.

The graph answers two questions for a pruned layer: which parameters disappear with its filters (its own rows,
the consuming BatchNorm entries, coupled layers of a residual stream) and whether removal is sound at all
(Torch-Pruning mistakes zero-padding shortcuts for channel-preserving ops, so those are refused here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence

import torch
import torch_pruning as tp
from torch import nn

from pipeline.errors import PruningError

PRUNABLE_TYPES = (nn.Conv2d, nn.Linear)
BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)
ZERO_PADDING_OPS = ("ConstantPadNd",)


@dataclass(frozen=True)
class GroupMember:
    """A module whose output entries `indices` vanish when a pruned layer's filters are removed."""

    name: str
    module: nn.Module
    indices: torch.Tensor


def prunable_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Conv2d and Linear modules by full name: the layers whose output filters can be selected."""
    return {name: module for name, module in model.named_modules() if isinstance(module, PRUNABLE_TYPES)}


def build_graph(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    """Trace the model's dependencies, keeping its train/eval mode (tracing switches it to eval)."""
    was_training = model.training
    try:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    finally:
        model.train(was_training)
    return graph


def pruning_group(graph: tp.DependencyGraph, module: nn.Module, indices: Sequence[int]) -> tp.Group:
    """The Torch-Pruning group that removes `indices` from `module`'s outputs and everything coupled to them."""
    pruner = graph.get_pruner_of_module(module)
    return graph.get_pruning_group(module, pruner.prune_out_channels, idxs=list(indices))


def group_members(graph: tp.DependencyGraph, module: nn.Module, indices: Sequence[int]) -> List[GroupMember]:
    """Conv/Linear layers losing output filters and BatchNorms losing entries, with the indices they lose."""
    names = {id(m): n for n, m in graph.model.named_modules()}
    members = []
    for item in pruning_group(graph, module, indices):
        target = item.dep.target.module
        losing_outputs = graph.is_out_channel_pruning_fn(item.dep.handler)
        if isinstance(target, BATCHNORM_TYPES) or (isinstance(target, PRUNABLE_TYPES) and losing_outputs):
            members.append(GroupMember(names[id(target)], target, torch.tensor(sorted(set(item.idxs)))))
    return members


def check_removable(graph: tp.DependencyGraph, model: nn.Module, pruned: Mapping[str, torch.Tensor]) -> None:
    """Refuse removals Torch-Pruning would get wrong or that would change what the network outputs."""
    for name, indices in pruned.items():
        module = model.get_submodule(name)
        if not graph.module2node[module].outputs:
            raise PruningError(f"Layer '{name}' produces the network's output; its outputs are the classes and "
                               f"cannot be pruned. Remove it from prune.layers or add it to prune.skip.")
        group = pruning_group(graph, module, indices.tolist())
        ops = {item.dep.target.grad_fn.name() for item in group if item.dep.target.grad_fn is not None}
        if any(pad in op for op in ops for pad in ZERO_PADDING_OPS):
            raise PruningError(
                f"Layer '{name}' writes into a residual stream whose shortcuts zero-pad channels ('option A' "
                f"shortcuts); the dependency graph cannot remove such channels correctly. Prune only layers inside "
                f"residual blocks (e.g. '*layer*.conv1'), or build the model with `shortcut: B` in model.options.")
        coupled = sorted(m.name for m in group_members(graph, module, indices.tolist())
                         if m.name != name and m.name in pruned)
        if coupled:
            raise PruningError(f"Layers '{name}' and {coupled} share their output channels (a residual stream), so "
                               f"their filters cannot be chosen separately. Select only one of them in prune.layers "
                               f"or list the others in prune.skip.")


def remove_filters(model: nn.Module, pruned: Mapping[str, torch.Tensor],
                   example_inputs: torch.Tensor) -> nn.Module:
    """Physically remove the given output filters (and everything that depends on them) in place.

    Indices refer to the dense model's filters. The result is a genuinely smaller dense network; parameters are
    replaced, so optimizers built before must be rebuilt.
    """
    graph = build_graph(model, example_inputs)
    check_removable(graph, model, pruned)
    for name, indices in pruned.items():
        if len(indices):
            pruning_group(graph, model.get_submodule(name), indices.tolist()).prune()
    return model


def removal_members(model: nn.Module, pruned: Mapping[str, torch.Tensor],
                    example_inputs: torch.Tensor) -> List[GroupMember]:
    """Everything the removal of `pruned` takes away, e.g. to build the 'filters zeroed' reference model."""
    graph = build_graph(model, example_inputs)
    return [member for name, indices in pruned.items()
            for member in group_members(graph, model.get_submodule(name), indices.tolist())]


@torch.no_grad()
def zero_members(members: Sequence[GroupMember]) -> None:
    """Zero the outputs that removal will take away: filter rows, biases, BatchNorm scale and shift."""
    for member in members:
        for parameter in (getattr(member.module, "weight", None), getattr(member.module, "bias", None)):
            if parameter is not None:
                parameter[member.indices.to(parameter.device)] = 0
