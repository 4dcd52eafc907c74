"""The training step as a function of one batch, built once per phase in the mode `trainer.step` asks for.

- `eager` runs `train_step` as written.
- `compile` runs it through `torch.compile`: forward, loss with the hooks' terms, backward, gradient edits and the
  optimizer step, split by TorchDynamo only where it must (at `backward()`), recompiled only when the learning rate
  changes at an epoch boundary.
- `graph` captures the whole step as one CUDA graph after a few eager warm-up steps on a side stream (they create
  the momentum buffers and initialise cuBLAS/cuDNN), then replays it with the batch copied into static buffers;
  it is captured again when the scheduler changes the learning rate, which SGD bakes into its kernels.

The step is the unit that can be compiled or captured because everything that changes from step to step inside
it lives in device tensors; the hooks' `after_optimizer_step` (host-side schedules) always runs eagerly after it.
A batch of another shape than the first (the last, partial batch of an epoch) runs eagerly rather than
triggering a recompilation or a capture of its own.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import nn

from pipeline.runtime import Runtime, autocast, check_graph_mode
from pipeline.hooks import TrainingHooks

StepFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
WARMUP_STEPS = 3


class _WithoutAfterStep:
    """The hooks as the compiled or captured part sees them: everything except the host-side schedule update."""

    def __init__(self, hooks) -> None:
        self.hooks = hooks

    def extra_loss(self) -> Optional[torch.Tensor]:
        return self.hooks.extra_loss()

    def before_optimizer_step(self) -> None:
        self.hooks.before_optimizer_step()

    def after_optimizer_step(self) -> None:
        """Deferred: `build_step` calls the real hooks' method after the compiled or captured part."""


def train_step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, hooks: TrainingHooks, device: torch.device,
               amp: str) -> torch.Tensor:
    """One eager SGD step; returns [loss·batch, correct] as a device tensor (no sync)."""
    inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
    with autocast(device, amp):
        logits = model(inputs)
    loss = nn.functional.cross_entropy(logits.float(), targets)
    extra = hooks.extra_loss()
    total = loss if extra is None else loss + extra
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    scaler.unscale_(optimizer)
    hooks.before_optimizer_step()
    scaler.step(optimizer)
    scaler.update()
    hooks.after_optimizer_step()
    return torch.stack([loss.detach() * len(targets), (logits.argmax(dim=1) == targets).sum().float()])


def build_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, hooks,
               runtime: Runtime) -> StepFunction:
    """A function (inputs, targets) → [loss·batch, correct] on the device that trains `model` one step."""
    inner_hooks = _WithoutAfterStep(hooks)

    def update(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return train_step(model, inputs, targets, optimizer, scaler, inner_hooks, runtime.device, runtime.amp)

    if runtime.step == "compile":
        core: StepFunction = _FirstShapeOnly(torch.compile(update), update)
    elif runtime.step == "graph":
        core = _GraphedStep(update, optimizer, runtime)
    else:
        core = update

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        inputs = inputs.to(runtime.device, non_blocking=True)
        targets = targets.to(runtime.device, non_blocking=True)
        if runtime.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        totals = core(inputs, targets)
        hooks.after_optimizer_step()
        return totals

    return step


def _shapes(inputs: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Size, torch.Size]:
    return inputs.shape, targets.shape


class _FirstShapeOnly:
    """Route batches of the first shape seen to `fast` and any other (a partial last batch) to `eager`."""

    def __init__(self, fast: StepFunction, eager: StepFunction) -> None:
        self.fast, self.eager = fast, eager
        self.shapes: Optional[Tuple[torch.Size, torch.Size]] = None

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.shapes is None:
            self.shapes = _shapes(inputs, targets)
        return (self.fast if _shapes(inputs, targets) == self.shapes else self.eager)(inputs, targets)


class _GraphedStep:
    """The step captured as one CUDA graph and replayed with each batch copied into static input buffers."""

    def __init__(self, update: StepFunction, optimizer: torch.optim.Optimizer, runtime: Runtime) -> None:
        check_graph_mode(runtime.amp, runtime.world_size)
        self.update, self.optimizer, self.device = update, optimizer, runtime.device
        self.side_stream = torch.cuda.Stream(runtime.device)
        self.warmed_up = 0
        self.shapes: Optional[Tuple[torch.Size, torch.Size]] = None
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.captured_lrs: Tuple[float, ...] = ()
        self.static: Tuple[torch.Tensor, ...] = ()

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.shapes is None:
            self.shapes = _shapes(inputs, targets)
        if _shapes(inputs, targets) != self.shapes:
            return self.update(inputs, targets)
        if self.warmed_up < WARMUP_STEPS:
            self.warmed_up += 1
            return self._on_side_stream(inputs, targets)
        if self.graph is None or self._lrs() != self.captured_lrs:
            self._capture(inputs, targets)
        static_inputs, static_targets, static_totals = self.static
        static_inputs.copy_(inputs, non_blocking=True)
        static_targets.copy_(targets, non_blocking=True)
        self.graph.replay()
        return static_totals

    def _lrs(self) -> Tuple[float, ...]:
        return tuple(float(group["lr"]) for group in self.optimizer.param_groups)

    def _on_side_stream(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """An ordinary (eager) training step on a side stream, as CUDA graphs want their warm-up."""
        current = torch.cuda.current_stream(self.device)
        self.side_stream.wait_stream(current)
        with torch.cuda.stream(self.side_stream):
            totals = self.update(inputs, targets)
        current.wait_stream(self.side_stream)
        return totals

    def _capture(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Record the step on static copies of this batch; nothing runs until the first replay.

        Autocast's weight-cast cache is switched off inside the capture: cached casts must not outlive it. The
        capture is thread-local: a DataLoader's pin-memory thread allocating pinned buffers meanwhile (a CUDA call
        from another thread) would otherwise invalidate it, and its own work does not belong in the graph.
        """
        self.graph = None
        self.static = ()
        static_inputs, static_targets = inputs.clone(), targets.clone()
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type="cuda", enabled=False, cache_enabled=False):
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static_totals = self.update(static_inputs, static_targets)
        self.graph, self.static, self.captured_lrs = graph, (static_inputs, static_targets, static_totals), self._lrs()
