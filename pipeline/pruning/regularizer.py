"""The TPP regularizer: Gram decorrelation, growing L2 and BatchNorm penalties, and the λ schedule.

Notation follows tpp-method.md: for a pruned layer with weight W (N filters as rows), G = W Wᵀ and kept-filter
mask m, the decorrelation term is R = mean over all N² entries of ((1 − m_i m_j) G_ij)²; the growing L2 and the
BatchNorm penalties are injected into gradients between `backward()` and `optimizer.step()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional

import torch
from torch import nn

from pipeline.config import RegularizerConfig
from pipeline.pruning.surgery import (BATCHNORM_TYPES, GroupMember, build_graph, check_removable, group_members,
                                      zero_members)
from pipeline.training.loop import TrainingHooks


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

    def advice(self) -> str:
        return (f", or make TPP's penalties grow more gently: prune.reg.alpha (now {self.config.alpha:g}) or "
                f"prune.reg.delta (now {self.config.delta:g}, λ is {self.current_lambda:g} at this step)")

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.step = int(state["step"])


def _row_mask(parameter: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """0/1 mask over dim 0 shaped to broadcast against `parameter`."""
    mask = torch.zeros(parameter.shape[0], dtype=parameter.dtype, device=parameter.device)
    mask[indices.to(parameter.device)] = 1
    return mask.view(-1, *([1] * (parameter.dim() - 1)))

