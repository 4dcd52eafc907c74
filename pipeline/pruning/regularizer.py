"""The TPP regularizer: Gram decorrelation, growing L2 and BatchNorm penalties, and the λ schedule.

Notation follows tpp-method.md: for a pruned layer with weight W (N filters as rows), G = W Wᵀ and kept-filter
mask m, the decorrelation term is R = mean over all N² entries of ((1 − m_i m_j) G_ij)²; the growing L2 and the
BatchNorm penalties are injected into gradients between `backward()` and `optimizer.step()`.

The per-step work is shaped for the fast step modes (`pipeline.training.step`): λ lives in device tensors that the
host refreshes in place when the schedule moves it (so a compiled step never recompiles and a CUDA graph replays
the new value), the Gram terms of equally shaped layers are one batched matmul, and the gradient injection is two
foreach ops over precomputed masks, whatever λ is (at λ = 0 they add exact zeros). About 300 lines: the three
penalties, the λ schedule and the reference's zero-out act on the same per-layer masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from pipeline.config import RegularizerConfig
from pipeline.errors import ConfigError
from pipeline.pruning.surgery import BATCHNORM_TYPES, GroupMember, build_graph, check_removable, group_members
from pipeline.hooks import TrainingHooks


def pruned_pair_mask(filters: int, pruned: torch.Tensor, device: torch.device) -> torch.Tensor:
    """N×N mask, 1 where a pruned filter is involved: the Gram entries TPP drives to zero (kept–kept pairs are 0,
    free)."""
    kept = torch.ones(filters, dtype=torch.bool, device=device)
    kept[pruned.to(device)] = False
    return (~(kept[:, None] & kept[None, :])).to(torch.float32)


def batched_gram_penalty(weights: Sequence[torch.Tensor], pair_masks: torch.Tensor) -> torch.Tensor:
    """Σ_l mean((G_l ⊙ M_l)²) over equally shaped weights, G = W Wᵀ over flattened filters: one bmm instead of one
    small matmul per layer, in float32 even under autocast.

    `pair_masks` stacks the layers' `pruned_pair_mask`s ([L, N, N]). Each layer's term equals mean((G − T)²) with
    T = G.detach() on kept–kept entries and 0 elsewhere, in value and gradient.
    """
    with torch.autocast(device_type=pair_masks.device.type, enabled=False):
        rows = torch.stack([weight.float().flatten(1) for weight in weights])
        gram = torch.bmm(rows, rows.transpose(1, 2))
        return (gram * pair_masks).pow(2).mean(dim=(1, 2)).sum()


# The reference's learnable layers (its `LEARNABLES`, attention aside): zero-out counts them all, pruned or not.
LEARNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)


def learnable_layer_order(model: nn.Module, example_inputs: torch.Tensor) -> List[str]:
    """Names of the model's learnable layers in the order the forward pass first calls them, as the reference
    indexes them (through forward hooks). Run in eval mode so the probe leaves BatchNorm statistics alone."""
    order: List[str] = []
    handles = [module.register_forward_hook(lambda *_, name=name: order.append(name) if name not in order else None)
               for name, module in model.named_modules() if isinstance(module, LEARNABLE_TYPES)]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example_inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return order


def check_zero_out_schedule(config: RegularizerConfig, learnable_layers: int) -> None:
    """The reference refuses a stabilize phase too short for zero-out to reach its last layer
    (`stabilize_reg_interval < zero_out_interval * num_layers`): later layers would never be zeroed."""
    needed = config.zero_out_interval * learnable_layers
    if config.zero_out and config.stabilize_steps < needed:
        raise ConfigError(
            f"params.yaml: 'prune.reg.zero_out' is on, but 'prune.reg.stabilize_steps' ({config.stabilize_steps}) "
            f"is shorter than 'prune.reg.zero_out_interval' ({config.zero_out_interval}) × the model's "
            f"{learnable_layers} learnable layers = {needed}, so the last layers would never be zeroed (the "
            f"reference refuses this too). Set prune.reg.stabilize_steps to at least {needed}, lower "
            f"prune.reg.zero_out_interval to at most {config.stabilize_steps // max(learnable_layers, 1)}, or turn "
            f"zero_out off.")


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
    """A parameter and a 0/1 mask of its shape (and memory layout) marking the entries of pruned filters."""

    parameter: nn.Parameter
    mask: torch.Tensor

    def aligned_mask(self) -> torch.Tensor:
        """The mask in the parameter's current layout (channels_last may be applied after construction), so that
        the foreach injection keeps its fused multi-tensor path instead of falling back to one kernel per tensor."""
        if self.mask.stride() != self.parameter.stride():
            self.mask = torch.empty_like(self.parameter).copy_(self.mask)
        return self.mask


@dataclass
class _PrunedLayer:
    name: str
    weight: nn.Parameter
    pair_mask: torch.Tensor
    members: List[GroupMember]


@dataclass
class _GramGroup:
    """Pruned layers whose weights share one shape, with their pair masks stacked for `batched_gram_penalty`."""

    weights: List[nn.Parameter]
    pair_masks: torch.Tensor


class TPPRegularizer(TrainingHooks):
    """TPP as hooks around an ordinary training loop (in the spirit of Torch-Pruning's pruners).

    Per step: `extra_loss()` adds α·λ_t·Σ_l R_l to the task loss; `before_optimizer_step()` adds λ_t·w to the
    gradient of every pruned filter (weight rows, biases) and, with `bn_penalty`, to the consuming BatchNorm's
    γ/β entries (found through the dependency graph); `after_optimizer_step()` advances the schedule and, with
    `zero_out`, re-zeroes the pruned filters of every layer that is due (`_zero_out_due_layers`).
    Everything is precomputed as masks: no Python loop over filters and no host–device sync per step.

    The host keeps the schedule's step (`step`, `current_lambda`, `finished()`, `stabilizing`); setting `step`
    refreshes the device tensors λ_t and α·λ_t that the per-step computation reads.
    """

    def __init__(self, model: nn.Module, pruned: Mapping[str, torch.Tensor], example_inputs: torch.Tensor,
                 config: RegularizerConfig):
        graph = build_graph(model, example_inputs)
        check_removable(graph, model, pruned)
        self.config = config
        self.schedule = LambdaSchedule.from_config(config)
        self.layers = [self._prepare_layer(graph, model, name, indices) for name, indices in pruned.items()]
        self.penalized = [tensor for layer in self.layers for tensor in self._penalized_tensors(layer)]
        self.groups = _gram_groups(self.layers)
        self.zero_out_index: Dict[str, int] = {}
        if config.zero_out:
            order = learnable_layer_order(model, example_inputs)
            check_zero_out_schedule(config, len(order))
            self.zero_out_index = {layer.name: order.index(layer.name) for layer in self.layers}
        device = self.layers[0].weight.device if self.layers else torch.device("cpu")
        self._lambda = torch.zeros((), device=device)
        self._strength = torch.zeros((), device=device)
        self._device_step: Optional[int] = None
        self.iteration = 0

    @staticmethod
    def _prepare_layer(graph, model: nn.Module, name: str, indices: torch.Tensor) -> _PrunedLayer:
        weight = model.get_submodule(name).weight
        return _PrunedLayer(name, weight, pruned_pair_mask(weight.shape[0], indices, weight.device),
                            group_members(graph, model.get_submodule(name), indices.tolist()))

    def _penalized_tensors(self, layer: _PrunedLayer) -> List[_PenalizedTensor]:
        """Masks for the growing L2 on filter rows/biases and, if enabled, on BatchNorm γ/β."""
        tensors = []
        for member in layer.members:
            if isinstance(member.module, BATCHNORM_TYPES) and not self.config.bn_penalty:
                continue
            for parameter in (member.module.weight, member.module.bias):
                if parameter is not None:
                    tensors.append(_PenalizedTensor(parameter, _entry_mask(parameter, member.indices)))
        return tensors

    @property
    def iteration(self) -> int:
        """Optimizer steps taken under this schedule, the t of λ_t (host-side: reading it never waits for the
        device)."""
        return self._iteration

    @iteration.setter
    def iteration(self, value: int) -> None:
        self._iteration = int(value)
        self._refresh_device_lambda()

    def _refresh_device_lambda(self) -> None:
        """Write λ_t and α·λ_t into their device tensors in place, only when the schedule changed them.

        `fill_` takes the value as a kernel argument: no host–device copy to wait for, and the tensors keep their
        addresses, which a captured graph or a compiled step reads.
        """
        lam = self.current_lambda
        if self._device_step is None or lam != self.schedule(self._device_step):
            self._lambda.fill_(lam)
            self._strength.fill_(self.config.alpha * lam)
        self._device_step = self._iteration

    @property
    def current_lambda(self) -> float:
        return self.schedule(self.iteration)

    @property
    def stabilizing(self) -> bool:
        return self.iteration >= self.schedule.update_steps

    def extra_loss(self) -> Optional[torch.Tensor]:
        """α·λ_t·Σ_l R_l, one batched Gram per weight shape; None when α is 0 or the term is switched off.

        While λ_t is still 0 this is an exact zero rather than None, so that the step has the same operations at
        every step (a captured graph cannot skip them later).
        """
        if self.config.alpha == 0 or not self.config.decorrelation or not self.groups:
            return None
        return self._strength * torch.stack([batched_gram_penalty(group.weights, group.pair_masks)
                                             for group in self.groups]).sum()

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """grad += λ_t · w on pruned entries: a (λ_t/2)‖w‖² loss routed through momentum like the reference."""
        parameters, grads, masks = self._injected()
        if parameters:
            torch._foreach_addcmul_(grads, parameters, torch._foreach_mul(masks, self._lambda))

    def _injected(self) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
        """Penalized parameters that received a gradient this step, their gradients and their masks."""
        present = [tensor for tensor in self.penalized if tensor.parameter.grad is not None]
        return ([tensor.parameter for tensor in present], [tensor.parameter.grad for tensor in present],
                [tensor.aligned_mask() for tensor in present])

    def after_optimizer_step(self) -> None:
        self.iteration += 1
        if self.config.zero_out:
            self._zero_out_due_layers()

    @torch.no_grad()
    def _zero_out_due_layers(self) -> None:
        """The reference's optional stabilize-phase zero-out (`_layerwise_zero_out`), after every optimizer step.

        With k the stabilize-phase index of the step just taken (0 for the first step at λ = τ) and i a pruned
        layer's index among all learnable layers in forward order, the layer is due once k ≥ (i + 1)·interval and
        is then re-zeroed at every step, since momentum would bring its weights back: its filter rows and its
        BatchNorm's γ/β, not its bias, like the reference.
        """
        since = self.iteration - 1 - self.schedule.update_steps
        for layer in self.layers:
            if since >= (self.zero_out_index[layer.name] + 1) * self.config.zero_out_interval:
                for member in layer.members:
                    if member.name == layer.name:
                        layer.weight[member.indices.to(layer.weight.device)] = 0
                    elif isinstance(member.module, BATCHNORM_TYPES):
                        for parameter in (member.module.weight, member.module.bias):
                            if parameter is not None:
                                parameter[member.indices.to(parameter.device)] = 0

    def finished(self) -> bool:
        return self.iteration >= self.schedule.total_steps

    def state_dict(self) -> Dict[str, int]:
        return {"iteration": self.iteration}

    def advice(self) -> str:
        return (f", or make TPP's penalties grow more gently: prune.reg.alpha (now {self.config.alpha:g}) or "
                f"prune.reg.delta (now {self.config.delta:g}, λ is {self.current_lambda:g} at this step)")

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.iteration = int(state["iteration"])


def _entry_mask(parameter: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """0/1 mask of `parameter`'s shape and layout, 1 on the rows (filters, channels) in `indices`.

    Full-shaped rather than broadcast, because foreach ops fuse only tensors of equal shape.
    """
    mask = torch.zeros_like(parameter)
    mask[indices.to(parameter.device)] = 1
    return mask


def _gram_groups(layers: Sequence[_PrunedLayer]) -> List[_GramGroup]:
    """Layers grouped by weight shape (in order of first appearance), each group's pair masks stacked once."""
    by_shape: Dict[Tuple[int, ...], List[_PrunedLayer]] = {}
    for layer in layers:
        by_shape.setdefault(tuple(layer.weight.shape), []).append(layer)
    return [_GramGroup([layer.weight for layer in members], torch.stack([layer.pair_mask for layer in members]))
            for members in by_shape.values()]
