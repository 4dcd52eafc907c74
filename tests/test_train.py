"""The shared training loop: it learns, honours step budgets and hooks, and stops on a diverged loss."""

import pytest
import torch
from torch import nn

from pipeline.runtime import Runtime
from pipeline.errors import TrainingError
from pipeline.training.loop import TrainingHooks, evaluate, fit, sgd, step_schedule

CPU = torch.device("cpu")


def separable_batches(count=6, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        inputs = torch.randn(size, 4, generator=generator)
        batches.append((inputs, (inputs[:, 0] > 0).long()))
    return batches


def test_fit_learns_and_follows_the_step_schedule():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    batches = separable_batches()
    optimizer = sgd(model, lr=0.5, momentum=0.9, weight_decay=0.0)
    records = []
    history = fit(model, batches, batches, optimizer, runtime=Runtime(CPU), epochs=4,
                  scheduler=step_schedule(optimizer, [2, 3], 0.1), on_epoch=records.append)
    assert [r.epoch for r in history] == [1, 2, 3, 4] and records == history
    assert [r.lr for r in history] == pytest.approx([0.5, 0.5, 0.05, 0.005])
    assert history[-1].test_acc > 95 and history[-1].train_loss < history[0].train_loss
    assert evaluate(model, batches, CPU)[1] == pytest.approx(history[-1].test_acc)


class CountingHooks(TrainingHooks):
    def __init__(self, stop_after=None):
        self.calls, self.steps, self.stop_after = [], 0, stop_after

    def extra_loss(self):
        self.calls.append("loss")
        return None

    def before_optimizer_step(self):
        self.calls.append("before")

    def after_optimizer_step(self):
        self.calls.append("after")
        self.steps += 1

    def finished(self):
        return self.stop_after is not None and self.steps >= self.stop_after


def test_max_steps_ends_mid_epoch_and_hooks_run_in_order():
    model = nn.Linear(4, 2)
    hooks = CountingHooks()
    history = fit(model, separable_batches(), separable_batches(1), sgd(model, 0.1, 0.0, 0.0), runtime=Runtime(CPU),
                  max_steps=8, hooks=hooks)
    assert [r.step for r in history] == [6, 8]
    assert hooks.calls[:3] == ["loss", "before", "after"] and len(hooks.calls) == 24


def test_hooks_can_stop_training():
    model = nn.Linear(4, 2)
    history = fit(model, separable_batches(), separable_batches(1), sgd(model, 0.1, 0.0, 0.0), runtime=Runtime(CPU),
                  epochs=5, hooks=CountingHooks(stop_after=3))
    assert history[-1].step == 3 and len(history) == 1


def test_diverged_loss_raises_a_clear_error():
    model = nn.Linear(4, 2)
    batches = [(torch.full((8, 4), float("nan")), torch.zeros(8, dtype=torch.long))]
    with pytest.raises(TrainingError, match="pretrain loss became nan by step 1 .epoch 1.*Lower pretrain.lr"):
        fit(model, batches, batches, sgd(model, 0.1, 0.9, 0.0), runtime=Runtime(CPU), epochs=2, stage="pretrain")
