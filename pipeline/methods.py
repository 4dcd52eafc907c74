"""Pruning methods behind one registry: each takes the dense model and the selected filters and returns the
physically pruned network. All methods share the selection rule and layer ratios, so only the method differs.

A top-level module, above both `pruning` (selection, penalties, removal) and `training` (the loop the
regularized methods train with), so that neither of those imports the other.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Mapping, Optional

import torch
from torch import nn

from pipeline.config import PruneConfig
from pipeline.errors import ConfigError
from pipeline.pruning.orthogonal import activation_gain, orthogonalize_
from pipeline.pruning.surgery import prunable_layers, remove_filters
from pipeline.pruning.regularizer import TPPRegularizer
from pipeline.runtime import Runtime
from pipeline.training.loop import Batches, EpochRecord, evaluate, fit, sgd
from pipeline.training.state import ResumeFile


@dataclass
class PruneContext:
    """What a pruning method may use: the dense model, the chosen filters, data, how to compute, settings, the
    seed of methods that draw at random (random filters, scratch init) and where a training method keeps its
    resume state."""

    model: nn.Module
    pruned: Mapping[str, torch.Tensor]
    example_inputs: torch.Tensor
    train_batches: Batches
    test_batches: Batches
    runtime: Runtime
    settings: PruneConfig
    on_epoch: Optional[Callable[[EpochRecord], None]] = None
    seed: int = 0
    resume: Optional[ResumeFile] = None


@dataclass
class PruneOutcome:
    """The pruned network, the filters actually removed (indices into the dense layers), any training the method
    did before removal, and method-specific metrics."""

    model: nn.Module
    pruned: Mapping[str, torch.Tensor]
    history: List[EpochRecord] = field(default_factory=list)
    metrics: Dict[str, float] = field(default_factory=dict)


PruneMethod = Callable[[PruneContext], PruneOutcome]
REGULARIZED_METHODS = ("tpp", "greg")
_METHODS: Dict[str, PruneMethod] = {}


def register_method(name: str) -> Callable[[PruneMethod], PruneMethod]:
    def register(method: PruneMethod) -> PruneMethod:
        _METHODS[name] = method
        return method
    return register


def available_methods() -> List[str]:
    return sorted(_METHODS)


def run_method(name: str, context: PruneContext) -> PruneOutcome:
    if name not in _METHODS:
        close = difflib.get_close_matches(name, available_methods(), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"Unknown pruning method '{name}'.{hint} Available: {', '.join(available_methods())}.")
    return _METHODS[name](context)


@register_method("tpp")
def tpp(context: PruneContext) -> PruneOutcome:
    """Regularize the dense network with TPP until the schedule ends, then remove the filters."""
    settings = context.settings
    regularizer = TPPRegularizer(context.model, context.pruned, context.example_inputs, settings.reg)
    optimizer = sgd(context.model, settings.lr, settings.momentum, settings.weight_decay)
    history = fit(context.model, context.train_batches, context.test_batches, optimizer, runtime=context.runtime,
                  max_steps=regularizer.schedule.total_steps, hooks=regularizer, stage="prune",
                  resume=context.resume, on_epoch=context.on_epoch)
    _, accuracy_before_removal = evaluate(context.model, context.test_batches, context.runtime.device,
                                          context.runtime.amp)
    model = remove_filters(context.model, context.pruned, context.example_inputs)
    return PruneOutcome(model, context.pruned, history, {"acc_before_removal": accuracy_before_removal,
                                         "final_lambda": regularizer.current_lambda})


@register_method("l1")
def l1(context: PruneContext) -> PruneOutcome:
    """Li et al. 2017: remove the smallest-L1 filters in one shot; all repair is left to retraining."""
    return PruneOutcome(remove_filters(context.model, context.pruned, context.example_inputs), context.pruned)


@register_method("l1_orthp")
def l1_orthp(context: PruneContext) -> PruneOutcome:
    """L1 removal, then OrthP: every Conv2d/Linear weight re-orthogonalised (scaled by the activation gain), the
    paper's exact repair of dynamical isometry, to tell trainability repair apart from what TPP keeps."""
    model = l1(context).model
    return PruneOutcome(orthogonalize_(model, activation_gain(model)), context.pruned)


@register_method("random")
def random_filters(context: PruneContext) -> PruneOutcome:
    """Remove as many filters per layer as the selection, chosen uniformly at random: the floor that any
    importance criterion has to beat. The indices actually removed are returned."""
    pruned = random_selection(context.model, context.pruned, context.seed)
    return PruneOutcome(remove_filters(context.model, pruned, context.example_inputs), pruned)


def random_selection(model: nn.Module, pruned: Mapping[str, torch.Tensor], seed: int) -> Dict[str, torch.Tensor]:
    """Per layer of `pruned`, the same number of sorted filter indices drawn without replacement; one CPU
    generator seeded once, so the draw depends only on the seed and the layers, not on the device."""
    generator = torch.Generator().manual_seed(seed)
    filters = {name: layer.weight.shape[0] for name, layer in prunable_layers(model).items()}
    return {name: torch.randperm(filters[name], generator=generator)[:len(indices)].sort().values
            for name, indices in pruned.items()}


@register_method("scratch")
def scratch(context: PruneContext) -> PruneOutcome:
    """The L1-pruned architecture with every weight re-drawn, so retraining trains it from scratch: separates
    the value of the architecture from the value of the inherited weights."""
    return PruneOutcome(reinitialize_(l1(context).model, context.seed), context.pruned)


@torch.no_grad()
def reinitialize_(model: nn.Module, seed: int) -> nn.Module:
    """Call every module's own `reset_parameters()` (PyTorch's default init; BatchNorm statistics reset too)
    under `seed`, with the global RNG state forked so callers' randomness is left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return model


@register_method("greg")
def greg(context: PruneContext) -> PruneOutcome:
    """GReg-1 (Wang et al. 2021): TPP's schedule with only the growing L2 on the pruned filters, i.e. TPP with
    the Gram decorrelation and BatchNorm terms switched off, so the comparison isolates those two terms."""
    reg = replace(context.settings.reg, decorrelation=False, bn_penalty=False)
    return tpp(replace(context, settings=replace(context.settings, reg=reg)))
