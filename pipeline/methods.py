"""Pruning methods behind one registry: each takes the dense model and the selected filters and returns the
physically pruned network. All methods share the selection rule and layer ratios, so only the method differs.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional

import torch
from torch import nn

from pipeline.config import PruneConfig
from pipeline.errors import ConfigError
from pipeline.surgery import remove_filters
from pipeline.tpp import TPPRegularizer
from pipeline.train import Batches, EpochRecord, evaluate, fit, sgd


@dataclass
class PruneContext:
    """What a pruning method may use: the dense model, the chosen filters, data and settings."""

    model: nn.Module
    pruned: Mapping[str, torch.Tensor]
    example_inputs: torch.Tensor
    train_batches: Batches
    test_batches: Batches
    device: torch.device
    settings: PruneConfig
    amp: str = "off"
    on_epoch: Optional[Callable[[EpochRecord], None]] = None


@dataclass
class PruneOutcome:
    """The pruned network, the filters actually removed (indices into the dense layers), any training the method
    did before removal, and method-specific metrics."""

    model: nn.Module
    pruned: Mapping[str, torch.Tensor]
    history: List[EpochRecord] = field(default_factory=list)
    metrics: Dict[str, float] = field(default_factory=dict)


PruneMethod = Callable[[PruneContext], PruneOutcome]
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
    history = fit(context.model, context.train_batches, context.test_batches, optimizer, device=context.device,
                  max_steps=regularizer.schedule.total_steps, hooks=regularizer, amp=context.amp, stage="prune",
                  on_epoch=context.on_epoch)
    _, accuracy_before_removal = evaluate(context.model, context.test_batches, context.device, context.amp)
    model = remove_filters(context.model, context.pruned, context.example_inputs)
    return PruneOutcome(model, context.pruned, history, {"acc_before_removal": accuracy_before_removal,
                                         "final_lambda": regularizer.current_lambda})


@register_method("l1")
def l1(context: PruneContext) -> PruneOutcome:
    """Li et al. 2017: remove the smallest-L1 filters in one shot; all repair is left to retraining."""
    return PruneOutcome(remove_filters(context.model, context.pruned, context.example_inputs), context.pruned)
