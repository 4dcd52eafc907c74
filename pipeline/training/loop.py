"""The one training loop, shared by pretraining, TPP's regularized phase and retraining.

Methods plug in through `TrainingHooks` (extra loss terms, gradient edits between backward and the optimizer
step, a stopping rule) instead of owning loops of their own. The step does no host–device synchronisation:
losses and correct counts accumulate on the device and are read once per epoch (and every
`NAN_CHECK_INTERVAL` steps, to stop early on a diverged loss).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from pipeline.errors import TrainingError
from pipeline.progress import StageProgress
from pipeline.runtime import autocast

NAN_CHECK_INTERVAL = 200
Batches = Iterable[Tuple[torch.Tensor, torch.Tensor]]


class TrainingHooks:
    """Extension points of the training loop; every default does nothing."""

    def extra_loss(self) -> Optional[torch.Tensor]:
        """A term added to the task loss this step (e.g. TPP's decorrelation), or None."""
        return None

    def before_optimizer_step(self) -> None:
        """Edit gradients after backward() (they are unscaled here under fp16)."""

    def after_optimizer_step(self) -> None:
        """Advance schedules once the parameters have moved."""

    def finished(self) -> bool:
        """Stop the loop early (e.g. a regularization schedule that is complete)."""
        return False

    def epoch_metrics(self, model: nn.Module) -> Dict[str, float]:
        """Extra measurements of the model at the end of each epoch (e.g. its trainability), logged with it."""
        return {}


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


def step_schedule(optimizer: torch.optim.Optimizer, milestones: Sequence[int],
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


def fit(model: nn.Module, train_batches: Batches, test_batches: Batches, optimizer: torch.optim.Optimizer, *,
        device: torch.device, epochs: Optional[int] = None, max_steps: Optional[int] = None,
        scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None, hooks: Optional[TrainingHooks] = None,
        amp: str = "fp32", stage: str = "train",
        on_epoch: Optional[Callable[[EpochRecord], None]] = None) -> List[EpochRecord]:
    """Train for `epochs` epochs or `max_steps` steps (the last epoch may be partial); evaluate after each epoch."""
    if (epochs is None) == (max_steps is None):
        raise ValueError("fit() takes exactly one of epochs and max_steps")
    hooks = hooks or TrainingHooks()
    steps_per_epoch = len(train_batches)
    epochs = epochs if epochs is not None else math.ceil(max_steps / steps_per_epoch)
    total_steps = max_steps if max_steps is not None else epochs * steps_per_epoch
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    history: List[EpochRecord] = []
    step = 0
    with StageProgress(stage, total=total_steps) as progress:
        for epoch in range(1, epochs + 1):
            started = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            model.train()
            totals, count = torch.zeros(2, device=device), 0
            for inputs, targets in train_batches:
                if step >= total_steps or hooks.finished():
                    break
                totals += train_step(model, inputs, targets, optimizer, scaler, hooks, device, amp)
                count += len(targets)
                step += 1
                progress.advance()
                if step % NAN_CHECK_INTERVAL == 0:
                    _check_finite(totals[0].item(), stage, epoch, lr)
            loss_sum, correct = totals.tolist()
            _check_finite(loss_sum, stage, epoch, lr)
            if scheduler is not None:
                scheduler.step()
            test_loss, test_acc = evaluate(model, test_batches, device, amp)
            extra = hooks.epoch_metrics(model)
            record = EpochRecord(epoch, step, lr, loss_sum / max(count, 1), 100.0 * correct / max(count, 1),
                                 test_loss, test_acc, time.perf_counter() - started, extra)
            history.append(record)
            measured = "".join(f" {key} {value:.4g}" for key, value in extra.items())
            progress.log(f"[{stage}] epoch {epoch}/{epochs} step {step}/{total_steps} lr {lr:.3g} "
                         f"loss {record.train_loss:.4f} train_acc {record.train_acc:.2f}% "
                         f"test_acc {record.test_acc:.2f}%{measured} ({record.seconds:.1f}s)")
            if on_epoch is not None:
                on_epoch(record)
            if step >= total_steps or hooks.finished():
                break
    return history


def train_step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler, hooks: TrainingHooks, device: torch.device,
                amp: str) -> torch.Tensor:
    """One SGD step; returns [loss·batch, correct] as a device tensor (no sync)."""
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


def _check_finite(loss_sum: float, stage: str, epoch: int, lr: float) -> None:
    """Stop on a diverged loss with advice, before any checkpoint is written."""
    if not math.isfinite(loss_sum):
        raise TrainingError(f"The {stage} loss became {loss_sum} in epoch {epoch} (learning rate {lr:g}); "
                            f"training diverged and nothing was written. Lower {stage}.lr in params.yaml "
                            f"(or check the data for NaNs) and rerun.")
