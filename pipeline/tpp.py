"""Trainability Preserving Pruning: filter selection, the λ schedule and the TPP regularizer.

Notation follows tpp-method.md: for a pruned layer with weight W (N filters as rows), G = W Wᵀ and kept-filter
mask m, the decorrelation term is R = mean over all N² entries of ((1 − m_i m_j) G_ij)²; the growing L2 and the
BatchNorm penalties are injected into gradients between `backward()` and `optimizer.step()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from pipeline.config import RegularizerConfig
from pipeline.errors import PruningError
from pipeline.surgery import (BATCHNORM_TYPES, GroupMember, build_graph, check_removable, group_members,
                              prunable_layers, zero_members)
from pipeline.train import TrainingHooks

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


def kept_pair_mask(filters: int, pruned: torch.Tensor, device: torch.device) -> torch.Tensor:
    """N×N mask, 1 where a pruned filter is involved: the Gram entries TPP drives to zero."""
    kept = torch.ones(filters, dtype=torch.bool, device=device)
    kept[pruned.to(device)] = False
    return (~(kept[:, None] & kept[None, :])).to(torch.float32)


def masked_gram_penalty(weight: torch.Tensor, pair_mask: torch.Tensor) -> torch.Tensor:
    """mean((G ⊙ mask)²), G = W Wᵀ over flattened filters, in float32 even under autocast.

    Equal in value and gradient to mean((G − T)²) with T = G.detach() on kept–kept entries and 0 elsewhere.
    """
    with torch.autocast(device_type=weight.device.type, enabled=False):
        rows = weight.float().flatten(1)
        return ((rows @ rows.T) * pair_mask).pow(2).mean()


def decorrelation_loss(weight: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """TPP's Gram decorrelation term for one Conv2d ([N,C,k,k]) or Linear ([N,D]) weight and its pruned indices."""
    return masked_gram_penalty(weight, kept_pair_mask(weight.shape[0], pruned, weight.device))


@dataclass(frozen=True)
class LambdaSchedule:
    """λ_t = min(τ, Δ·floor(t / K_u)), then K_s stabilize steps at τ: a pure function of the step."""

    delta: float
    interval: int
    max_lambda: float
    stabilize_steps: int

    @classmethod
    def from_config(cls, config: RegularizerConfig) -> "LambdaSchedule":
        return cls(config.delta, config.interval, config.max_lambda, config.stabilize_steps)

    @property
    def update_steps(self) -> int:
        """Steps until λ first reaches τ (K_u·τ/Δ), rounded so float noise adds no extra increment."""
        return self.interval * math.ceil(round(self.max_lambda / self.delta, 6))

    @property
    def total_steps(self) -> int:
        return self.update_steps + self.stabilize_steps

    def __call__(self, step: int) -> float:
        return min(self.max_lambda, self.delta * (step // self.interval))


@dataclass
class _PenalizedTensor:
    """A parameter and a broadcastable 0/1 mask of its entries that belong to pruned filters."""

    parameter: nn.Parameter
    mask: torch.Tensor


@dataclass
class _PrunedLayer:
    name: str
    weight: nn.Parameter
    pair_mask: torch.Tensor
    members: List[GroupMember]


class TPPRegularizer(TrainingHooks):
    """TPP as hooks around an ordinary training loop (in the spirit of Torch-Pruning's pruners).

    Per step: `extra_loss()` adds α·λ_t·Σ_l R_l to the task loss; `before_optimizer_step()` adds λ_t·w to the
    gradient of every pruned filter (weight rows, biases) and, with `bn_penalty`, to the consuming BatchNorm's
    γ/β entries (found through the dependency graph); `after_optimizer_step()` advances the schedule and, with
    `zero_out`, zeroes one more layer's pruned filters every `zero_out_interval` stabilize steps.
    Everything is precomputed as masks: no Python loop over filters and no host–device sync per step.
    """

    def __init__(self, model: nn.Module, pruned: Mapping[str, torch.Tensor], example_inputs: torch.Tensor,
                 config: RegularizerConfig):
        graph = build_graph(model, example_inputs)
        check_removable(graph, model, pruned)
        self.config = config
        self.schedule = LambdaSchedule.from_config(config)
        self.step = 0
        self.layers = [self._prepare_layer(graph, model, name, indices) for name, indices in pruned.items()]
        self.penalized = [tensor for layer in self.layers for tensor in self._penalized_tensors(layer)]

    @staticmethod
    def _prepare_layer(graph, model: nn.Module, name: str, indices: torch.Tensor) -> _PrunedLayer:
        weight = model.get_submodule(name).weight
        return _PrunedLayer(name, weight, kept_pair_mask(weight.shape[0], indices, weight.device),
                            group_members(graph, model.get_submodule(name), indices.tolist()))

    def _penalized_tensors(self, layer: _PrunedLayer) -> List[_PenalizedTensor]:
        """Masks for the growing L2 on filter rows/biases and, if enabled, on BatchNorm γ/β."""
        tensors = []
        for member in layer.members:
            if isinstance(member.module, BATCHNORM_TYPES) and not self.config.bn_penalty:
                continue
            for parameter in (member.module.weight, member.module.bias):
                if parameter is not None:
                    tensors.append(_PenalizedTensor(parameter, _row_mask(parameter, member.indices)))
        return tensors

    @property
    def current_lambda(self) -> float:
        return self.schedule(self.step)

    @property
    def stabilizing(self) -> bool:
        return self.step >= self.schedule.update_steps

    def extra_loss(self) -> Optional[torch.Tensor]:
        """α·λ_t·Σ_l R_l; None while λ is 0 or the decorrelation term is switched off (nothing to compute)."""
        strength = self.config.alpha * self.current_lambda
        if strength == 0 or not self.config.decorrelation or not self.layers:
            return None
        return strength * torch.stack([masked_gram_penalty(layer.weight, layer.pair_mask)
                                       for layer in self.layers]).sum()

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """grad += λ_t · w on pruned entries: a (λ_t/2)‖w‖² loss routed through momentum like the reference."""
        lam = self.current_lambda
        if lam == 0:
            return
        for tensor in self.penalized:
            if tensor.parameter.grad is not None:
                tensor.parameter.grad.add_(tensor.parameter * tensor.mask, alpha=lam)

    def after_optimizer_step(self) -> None:
        self.step += 1
        if self.config.zero_out and self.stabilizing:
            self._zero_out_due_layer()

    def _zero_out_due_layer(self) -> None:
        """The reference's optional stabilize-phase zero-out: one more layer every `zero_out_interval` steps."""
        since = self.step - self.schedule.update_steps
        if since % self.config.zero_out_interval == 0:
            index = since // self.config.zero_out_interval - 1
            if 0 <= index < len(self.layers):
                zero_members(self.layers[index].members)

    def finished(self) -> bool:
        return self.step >= self.schedule.total_steps

    def state_dict(self) -> Dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.step = int(state["step"])


def _row_mask(parameter: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """0/1 mask over dim 0 shaped to broadcast against `parameter`."""
    mask = torch.zeros(parameter.shape[0], dtype=parameter.dtype, device=parameter.device)
    mask[indices.to(parameter.device)] = 1
    return mask.view(-1, *([1] * (parameter.dim() - 1)))

