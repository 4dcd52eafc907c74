"""The training step as a function of one batch, built once per phase in the mode `trainer.step` asks for.

- `eager` runs `train_step` as written.
- `compile` runs it through `torch.compile`: forward, loss with the hooks' terms, backward, gradient edits and the
  optimizer step, split by TorchDynamo only where it must (at `backward()`). Recompiles are bounded: Dynamo's
  caches are reset when a phase's step is built (a study's dozens of fits in one process would otherwise pile up
  on one code object past Dynamo's recompile limit, after which it silently runs the step eagerly), and the
  learning rates become tensors, so a scheduler's change is a new value, not a new graph. What remains is a
  compile on the first step and one on the second (the momentum buffers then exist). Should Dynamo still give up
  and fall back to eager, a warning says so.
- `graph` captures the whole step as one CUDA graph after a few eager warm-up steps on a side stream (they create
  the momentum buffers and initialise cuBLAS/cuDNN), then replays it with the batch copied into static buffers;
  it is captured again when the scheduler changes the learning rate, which SGD bakes into its kernels.

The step is the unit that can be compiled or captured because everything that changes from step to step inside
it lives in device tensors; the hooks' `after_optimizer_step` (host-side schedules) runs eagerly after it, once,
and only when the optimizer really stepped (fp16's GradScaler skips steps whose gradients overflowed, and such a
step must not move TPP's λ schedule). Only full batches (the loader's batch size per process) are compiled or
captured; another batch (an epoch's partial last one) runs eagerly, even when it is the first a resumed run sees.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Tuple, Union

import torch
from torch import nn

from pipeline.cuda_graphs import capture, on_side_stream
from pipeline.runtime import Runtime, autocast, check_graph_mode
from pipeline.hooks import TrainingHooks

StepFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
WARMUP_STEPS = 3
COMPILE_BACKEND: Union[str, Callable] = "inductor"   # tests swap in one that runs the traced graphs (no C compiler)


def train_step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, hooks: TrainingHooks, device: torch.device,
               amp: str) -> torch.Tensor:
    """One eager SGD step up to the scaler's update; returns [loss·batch, correct] as a device tensor (no sync).

    The hooks' `after_optimizer_step` is the caller's: it runs outside anything compiled or captured, and only
    when the scaler did not skip the step."""
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
    return torch.stack([loss.detach() * len(targets), (logits.argmax(dim=1) == targets).sum().float()])


def build_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, hooks,
               runtime: Runtime, batch_size: Optional[int] = None) -> StepFunction:
    """A function (inputs, targets) → [loss·batch, correct] on the device that trains `model` one step.

    `batch_size` is a full batch's size in this process (the loader's batch size over the process count); the
    compiled or captured step serves batches of that size. Without it, the first batch's size is taken."""

    def update(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return train_step(model, inputs, targets, optimizer, scaler, hooks, runtime.device, runtime.amp)

    if runtime.step == "compile":
        core: StepFunction = _CompiledStep(update, optimizer, batch_size)
    elif runtime.step == "graph":
        core = _GraphedStep(update, optimizer, runtime, batch_size)
    else:
        core = update

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        inputs = inputs.to(runtime.device, non_blocking=True)
        targets = targets.to(runtime.device, non_blocking=True)
        if runtime.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        scale = scaler.get_scale() if scaler.is_enabled() else None
        totals = core(inputs, targets)
        if not skipped_by_scaler(scaler, scale):
            hooks.after_optimizer_step()
        return totals

    return step


def skipped_by_scaler(scaler: torch.amp.GradScaler, scale_before: Optional[float]) -> bool:
    """Whether the GradScaler skipped the optimizer step just taken: it lowers its scale exactly when it found
    infinite or NaN gradients, and then leaves the parameters alone. (fp16 already synchronises every step to
    decide that, so reading the scale costs nothing more.)"""
    return scale_before is not None and scaler.get_scale() < scale_before


def lrs_as_tensors(optimizer: torch.optim.Optimizer) -> None:
    """Hold each group's learning rate in a 0-dim CPU tensor, which SGD accepts: a compiled step then reads it as an
    input, and a scheduler's change (written into the tensor) needs no new graph."""
    for group in optimizer.param_groups:
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float64)


class _FullBatch:
    """Tells a full batch from another one (a partial last batch) by its size."""

    def __init__(self, batch_size: Optional[int]) -> None:
        self.size = batch_size

    def __call__(self, targets: torch.Tensor) -> bool:
        if self.size is None:
            self.size = len(targets)
        return len(targets) == self.size


class _CompiledStep:
    """The step compiled for full batches, other batches eager, with a warning should Dynamo fall back to eager."""

    def __init__(self, update: StepFunction, optimizer: torch.optim.Optimizer, batch_size: Optional[int]) -> None:
        torch._dynamo.reset()
        lrs_as_tensors(optimizer)
        self.update, self.full = update, _FullBatch(batch_size)
        self.compiled = torch.compile(update, backend=COMPILE_BACKEND)
        self.limit_hits = recompile_limit_hits()

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not self.full(targets):
            return self.update(inputs, targets)
        totals = self.compiled(inputs, targets)
        if self.limit_hits is not None and recompile_limit_hits() != self.limit_hits:
            self.limit_hits = None
            warnings.warn("trainer.step 'compile': TorchDynamo hit its recompile limit "
                          f"({torch._dynamo.config.recompile_limit}) on the training step and runs part of it "
                          "eagerly from now on, so the rest of this phase is slower than it should be. Set "
                          "TORCH_LOGS=recompiles to see why it recompiled, or use `trainer.step: eager`.",
                          RuntimeWarning, stacklevel=2)
        return totals


def recompile_limit_hits() -> int:
    """How often Dynamo has given up on a frame for hitting its recompile limit in this process since the last
    reset (it then runs that frame eagerly)."""
    from torch._dynamo.utils import counters

    return sum(count for reason, count in counters["unimplemented"].items()
               if "recompile limit" in reason.lower() or "cache_size_limit" in reason)


class _GraphedStep:
    """The step captured as one CUDA graph and replayed with each batch copied into static input buffers."""

    def __init__(self, update: StepFunction, optimizer: torch.optim.Optimizer, runtime: Runtime,
                 batch_size: Optional[int]) -> None:
        check_graph_mode(runtime.amp, runtime.world_size)
        self.update, self.optimizer, self.device = update, optimizer, runtime.device
        self.full = _FullBatch(batch_size)
        self.side_stream = torch.cuda.Stream(runtime.device)
        self.warmed_up = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.captured_lrs: Tuple[float, ...] = ()
        self.static: Tuple[torch.Tensor, ...] = ()

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not self.full(targets):
            return self.update(inputs, targets)
        if self.warmed_up < WARMUP_STEPS:
            self.warmed_up += 1
            return on_side_stream(lambda: self.update(inputs, targets), self.device, self.side_stream)
        if self.graph is None or self._lrs() != self.captured_lrs:
            self._capture(inputs, targets)
        static_inputs, static_targets, static_totals = self.static
        static_inputs.copy_(inputs, non_blocking=True)
        static_targets.copy_(targets, non_blocking=True)
        self.graph.replay()
        return static_totals

    def _lrs(self) -> Tuple[float, ...]:
        return tuple(float(group["lr"]) for group in self.optimizer.param_groups)

    def _capture(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Record the step on static copies of this batch; nothing runs until the first replay. The gradients are
        dropped first so that the graph allocates its own in its private pool."""
        self.graph = None
        self.static = ()
        static_inputs, static_targets = inputs.clone(), targets.clone()
        self.optimizer.zero_grad(set_to_none=True)
        graph, static_totals = capture(lambda: self.update(static_inputs, static_targets))
        self.graph, self.static, self.captured_lrs = graph, (static_inputs, static_targets, static_totals), self._lrs()
