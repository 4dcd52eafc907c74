"""The one training loop, shared by pretraining, TPP's regularized phase and retraining.

Methods plug in through `TrainingHooks` (extra loss terms, gradient edits between backward and the optimizer
step, a stopping rule, per-epoch measurements) instead of owning loops of their own. The `Trainer` adds what long
runs need around the step: resume checkpoints (every `Runtime.checkpoint_every` steps and at every epoch end),
DistributedDataParallel when several processes train (BatchNorm synchronised, each rank's RNG its own), and a step function that may be compiled or captured
(`pipeline.training.step`). The step does no host–device synchronisation: losses and correct counts accumulate on
the device and are read at epoch ends, at resume checkpoints and every `NAN_CHECK_INTERVAL` steps, so a diverged
loss stops the run before a bad state is saved.

Its ~340 lines are one class on purpose: the epoch loop, its resume position and its checkpoints share the
`Trainer`'s state, and splitting them would pass that state around instead of reading it top to bottom.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from pipeline.errors import TrainingError
from pipeline.progress import StageProgress
from pipeline.runtime import Runtime, autocast
from pipeline.training import distributed
from pipeline.hooks import TrainingHooks
from pipeline.training.batchnorm import synchronised_batchnorm
from pipeline.training.state import ResumeFile, capture_rng, kill_point, restore_rng
from pipeline.training.step import StepFunction, build_step

NAN_CHECK_INTERVAL = 200
Batches = Iterable[Tuple[torch.Tensor, torch.Tensor]]
CPU = torch.device("cpu")


@dataclass(frozen=True)
class EpochRecord:
    """What one epoch measured; accuracies are percentages."""

    epoch: int
    step: int
    lr: float
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    seconds: float
    extra: Mapping[str, float] = field(default_factory=dict)

    def metrics(self) -> Dict[str, float]:
        """Everything measured, flat: the fixed fields, then what the hooks added."""
        fixed = {key: value for key, value in asdict(self).items() if key not in ("epoch", "step", "extra")}
        return {**fixed, **self.extra}


def sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD over every parameter, rebuilt whenever surgery replaces parameter objects."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def milestone_schedule(optimizer: torch.optim.Optimizer, milestones: Sequence[int],
                  gamma: float) -> torch.optim.lr_scheduler.MultiStepLR:
    """LR multiplied by `gamma` at each milestone epoch, as in the paper's retraining recipes."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, device: torch.device, amp: str = "fp32") -> Tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy (%) over `batches`, in eval mode; restores the previous mode."""
    was_training = model.training
    model.eval()
    totals, count = torch.zeros(2, device=device), 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(inputs)
        totals += torch.stack([nn.functional.cross_entropy(logits.float(), targets, reduction="sum"),
                               (logits.argmax(dim=1) == targets).sum().float()])
        count += len(targets)
    model.train(was_training)
    loss_sum, correct = totals.tolist()
    return loss_sum / max(count, 1), 100.0 * correct / max(count, 1)


@dataclass
class _Position:
    """Where the loop stands: the resumable part of its state that is not a module's."""

    epoch: int = 1
    batch: int = 0
    step: int = 0
    count: int = 0
    history: List[EpochRecord] = field(default_factory=list)


class Trainer:
    """Runs the loop for one phase: epochs of steps, evaluation after each epoch, resume checkpoints, DDP.

    The model, optimizer, scheduler and hooks are the caller's; the trainer only drives them, so that TPP and the
    baselines stay ordinary hook objects around one shared loop.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime, *,
                 scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
                 hooks: Optional[TrainingHooks] = None, stage: str = "train",
                 resume: Optional[ResumeFile] = None,
                 on_epoch: Optional[Callable[[EpochRecord], None]] = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.runtime = runtime
        self.scheduler = scheduler
        self.hooks = hooks or TrainingHooks()
        self.stage = stage
        self.resume = resume
        self.on_epoch = on_epoch
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp == "fp16")
        self.totals = torch.zeros(2, device=runtime.device)
        self.position = _Position()
        self._pending_rng: Optional[Mapping[str, Any]] = None

    def _build_step(self, batch_size: Optional[int]) -> StepFunction:
        """The step as configured (eager, compiled or a CUDA graph), through DDP when several processes train."""
        if self.runtime.channels_last:
            self.model.to(memory_format=torch.channels_last)
        forward = distributed.wrap(self.model, self.runtime.device, self.runtime.world_size)
        return build_step(forward, self.optimizer, self.scaler, self.hooks, self.runtime, batch_size)

    def fit(self, train_batches: Batches, test_batches: Batches, *, epochs: Optional[int] = None,
            max_steps: Optional[int] = None) -> List[EpochRecord]:
        """Train for `epochs` epochs or `max_steps` steps (the last epoch may be partial); evaluate after each
        epoch. Continues from the resume file when one matches, and removes nothing: the caller removes the file
        once its outputs are written."""
        if (epochs is None) == (max_steps is None):
            raise ValueError("fit() takes exactly one of epochs and max_steps")
        steps_per_epoch = len(train_batches)
        epochs = epochs if epochs is not None else math.ceil(max_steps / steps_per_epoch)
        total_steps = max_steps if max_steps is not None else epochs * steps_per_epoch
        order_state = self._restore()
        with synchronised_batchnorm(self.model, self.runtime.sync_bn and self.runtime.distributed), \
                StageProgress(self.stage, total=total_steps, enabled=self.runtime.is_main) as progress:
            step_function = self._build_step(_process_batch_size(train_batches, self.runtime.world_size))
            distributed.seed_per_rank(self.runtime.rank, self.runtime.world_size)
            progress.advance(self.position.step)
            while self._epoch_to_run(epochs, total_steps):
                self._run_epoch(step_function, train_batches, test_batches, epochs, total_steps, progress,
                                order_state)
                order_state = None
        self.model.zero_grad(set_to_none=True)   # a captured step's gradients would keep its graph's memory pool
        return list(self.position.history)

    def _epoch_to_run(self, epochs: int, total_steps: int) -> bool:
        """Another epoch to train, or the current one to end: an epoch with trained batches always gets its
        evaluation, record and epoch-end checkpoint, also in a run resumed after its last step (killed during the
        last evaluation)."""
        position = self.position
        return position.epoch <= epochs and (position.batch > 0 or not self._done(total_steps))

    def _done(self, total_steps: int) -> bool:
        return self.position.step >= total_steps or self.hooks.finished()

    def _run_epoch(self, step_function: StepFunction, train_batches: Batches, test_batches: Batches, epochs: int,
                   total_steps: int, progress: StageProgress, order_state: Optional[torch.Tensor]) -> None:
        """One epoch from the current position (mid-epoch after a resume), then its evaluation and record."""
        started = time.perf_counter()
        position = self.position
        lr = float(self.optimizer.param_groups[0]["lr"])   # a tensor in compile mode
        self.model.train()
        epoch_order = _start_epoch(train_batches, position.epoch, order_state)
        batches = _skip(train_batches, position.batch)
        if self._pending_rng is not None:
            restore_rng(self._pending_rng)
            self._pending_rng = None
        for inputs, targets in batches:
            if self._done(total_steps):
                break
            self.totals += step_function(inputs, targets)
            position.count += len(targets)
            position.step += 1
            position.batch += 1
            progress.advance()
            kill_point(self.stage, "step", position.step)
            if position.step % NAN_CHECK_INTERVAL == 0:
                self._check_finite(lr)
            if self.runtime.checkpoint_every and position.step % self.runtime.checkpoint_every == 0:
                self._save(epoch_order, lr)
                kill_point(self.stage, "checkpoint", position.step)
        count_tensor = torch.tensor([position.count], dtype=self.totals.dtype, device=self.totals.device)
        loss_sum, correct, count = distributed.all_sum(torch.cat([self.totals, count_tensor])).tolist()
        self._check_finite(lr, loss_sum)
        if self.scheduler is not None:
            self.scheduler.step()
        test_loss, test_acc = evaluate(self.model, test_batches, self.runtime.device, self.runtime.amp)
        kill_point(self.stage, "evaluate", position.epoch)
        extra = self.hooks.epoch_metrics(self.model)
        count = max(count, 1)
        record = EpochRecord(position.epoch, position.step, lr, loss_sum / count, 100.0 * correct / count,
                             test_loss, test_acc, time.perf_counter() - started, extra)
        position.history.append(record)
        position.epoch, position.batch, position.count = position.epoch + 1, 0, 0
        self.totals.zero_()
        self._save(_order_state(train_batches), lr)
        kill_point(self.stage, "epoch_end", record.epoch)
        if self.runtime.is_main:
            measured = "".join(f" {key} {value:.4g}" for key, value in extra.items())
            progress.log(f"[{self.stage}] epoch {record.epoch}/{epochs} step {record.step}/{total_steps} lr {lr:.3g} "
                         f"loss {record.train_loss:.4f} train_acc {record.train_acc:.2f}% "
                         f"test_acc {record.test_acc:.2f}%{measured} ({record.seconds:.1f}s)")
            if self.on_epoch is not None:
                self.on_epoch(record)

    def _check_finite(self, lr: float, loss_sum: Optional[float] = None) -> None:
        """Stop on a diverged loss with advice, before any checkpoint of the bad state is written."""
        loss_sum = distributed.all_sum(self.totals[:1].clone()).item() if loss_sum is None else loss_sum
        if math.isfinite(loss_sum):
            return
        advice = self.hooks.advice()
        raise TrainingError(
            f"The {self.stage} loss became {loss_sum} by step {self.position.step} (epoch {self.position.epoch}, "
            f"learning rate {lr:g}): training diverged and the stage wrote no output. Lower {self.stage}.lr in "
            f"params.yaml{advice} (or check the data for NaNs) and rerun; "
            + ("the last good resume checkpoint is kept, so the rerun continues from it unless you change settings."
               if self.resume is not None else "nothing was saved."))

    def _save(self, epoch_order: Optional[torch.Tensor], lr: float) -> None:
        """Write the resume file (main process only), after checking the loss is still finite (on every process:
        the check is a collective under DDP)."""
        if self.resume is None:
            return
        self._check_finite(lr)
        rng = distributed.all_gather(capture_rng())
        if not self.runtime.is_main:
            return
        position = self.position
        self.resume.save({
            "stage": self.stage, "epoch": position.epoch, "batch": position.batch, "step": position.step,
            "count": position.count, "totals": self.totals.cpu(),
            "history": [asdict(record) for record in position.history],
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "hooks": self.hooks.state_dict(),
            "rng": rng, "order": epoch_order,
        })

    def _restore(self) -> Optional[torch.Tensor]:
        """Load a matching resume file into the model, optimizer, scheduler, hooks and RNGs; return the saved
        state of the generator that draws the order of the epoch to continue or start (None without a file, or
        for batches without such a generator).

        The RNGs are restored only once the interrupted epoch's first batches have been skipped, because batches
        that are produced to be dropped may draw from the global RNG."""
        state = self.resume.load(quiet=not self.runtime.is_main) if self.resume is not None else None
        if state is None:
            return None
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.hooks.load_state_dict(state["hooks"])
        self._pending_rng = state["rng"][self.runtime.rank]
        self.totals = state["totals"].to(self.runtime.device)
        self.position = _Position(state["epoch"], state["batch"], state["step"], state["count"],
                                  [EpochRecord(**record) for record in state["history"]])
        if self.runtime.is_main:
            self.resume.announce(f"resuming from {self.resume.path}: step {self.position.step}, epoch "
                                 f"{self.position.epoch}, batch {self.position.batch}")
        return state["order"]


def _start_epoch(batches: Batches, epoch: int, order_state: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Fix this epoch's sample order (and a seeded sampler's augmentation draws); return the generator state
    that reproduces the order.

    Restoring `order_state` (from a resume file) makes the interrupted epoch draw the same order again. A sampler
    with `set_epoch` (a DistributedSampler, whose order depends only on its seed and the epoch, or the
    `SeededSamples` of a DataLoader) is told the epoch.
    """
    sampler = getattr(batches, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    generator = _order_generator(batches)
    if generator is not None and order_state is not None:
        generator.set_state(order_state)
    return _order_state(batches)


def _order_state(batches: Batches) -> Optional[torch.Tensor]:
    """The state of the generator that will draw the next epoch order of `batches` (None if it has none).

    Saved at every epoch end too: a fresh process's generator is freshly seeded, so without it a run resumed at
    an epoch boundary would draw epoch 1's order (and device augmentation) again instead of the next epoch's.
    """
    generator = _order_generator(batches)
    return None if generator is None else generator.get_state()


def _order_generator(batches: Batches) -> Optional[torch.Generator]:
    """The generator that draws an epoch's order: a DataLoader's sampler's (none for a DistributedSampler), or
    in-memory batches' own."""
    owner = getattr(batches, "sampler", batches)
    generator = getattr(owner, "generator", None)
    return generator if isinstance(generator, torch.Generator) else None


def _process_batch_size(batches: Batches, world_size: int) -> Optional[int]:
    """A full batch's size in this process (None when the batches do not say): in-memory batches hold the global
    batch and give each process its share; a DataLoader's batch size is the process's already."""
    size = getattr(batches, "batch_size", None)
    if size is None:
        return None
    return size // world_size if hasattr(batches, "world_size") else size


def _skip(batches: Batches, count: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """The epoch's batches after the first `count` (already trained before a resume).

    In-memory batches and a DataLoader whose sampler seeds each sample skip without producing them; any other
    iterable produces and drops them.
    """
    if count and hasattr(batches, "iterate_from"):
        return iter(batches.iterate_from(count))
    sampler = getattr(batches, "sampler", None)
    if count and hasattr(sampler, "skip_next"):
        sampler.skip_next(count * batches.batch_size)
        return iter(batches)
    iterator = iter(batches)
    for _ in range(count):
        next(iterator)
    return iterator


def fit(model: nn.Module, train_batches: Batches, test_batches: Batches, optimizer: torch.optim.Optimizer, *,
        runtime: Runtime = Runtime(CPU), epochs: Optional[int] = None, max_steps: Optional[int] = None,
        scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None, hooks: Optional[TrainingHooks] = None,
        stage: str = "train", resume: Optional[ResumeFile] = None,
        on_epoch: Optional[Callable[[EpochRecord], None]] = None) -> List[EpochRecord]:
    """Train with a `Trainer` for `epochs` epochs or `max_steps` steps; the functional entry point."""
    trainer = Trainer(model, optimizer, runtime, scheduler=scheduler, hooks=hooks, stage=stage, resume=resume,
                      on_epoch=on_epoch)
    return trainer.fit(train_batches, test_batches, epochs=epochs, max_steps=max_steps)
