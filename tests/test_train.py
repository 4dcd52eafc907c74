"""The shared training loop: it learns, honours step budgets and hooks, stops on a diverged loss, and resumes
exactly where a crashed run stopped."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from pipeline.runtime import Runtime
from pipeline.data import TensorBatches
from pipeline.errors import TrainingError
from pipeline.training.loop import TrainingHooks, evaluate, fit, milestone_schedule, sgd
from pipeline.training.state import ResumeFile

CPU = torch.device("cpu")


def separable_batches(count=6, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        inputs = torch.randn(size, 4, generator=generator)
        batches.append((inputs, (inputs[:, 0] > 0).long()))
    return batches


def test_fit_learns_and_follows_the_milestone_schedule():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    batches = separable_batches()
    optimizer = sgd(model, lr=0.5, momentum=0.9, weight_decay=0.0)
    records = []
    history = fit(model, batches, batches, optimizer, runtime=Runtime(CPU), epochs=4,
                  scheduler=milestone_schedule(optimizer, [2, 3], 0.1), on_epoch=records.append)
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


# --- resume ------------------------------------------------------------------------------------------------------


class Crash(Exception):
    """Stands in for a kill: raised by a hook after some steps."""


class CrashAfter(TrainingHooks):
    """Counts steps like a schedule (resumable state) and raises after `crash_at` steps when asked to."""

    def __init__(self, crash_at=None):
        self.steps, self.crash_at = 0, crash_at

    def after_optimizer_step(self):
        self.steps += 1
        if self.crash_at is not None and self.steps == self.crash_at:
            raise Crash()

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


def shuffled_run(tmp_path, hooks, fingerprint="same"):
    """A seeded model trained on shuffled TensorBatches with a momentum optimizer, an LR schedule and a resume file
    written every 4 steps: everything a resume must restore."""
    torch.manual_seed(0)
    inputs = torch.randn(90, 4, generator=torch.Generator().manual_seed(1))
    train = TensorBatches(inputs, (inputs[:, 0] > 0).long(), 16, shuffle=True, seed=3)
    test = TensorBatches(inputs, (inputs[:, 0] > 0).long(), 45, shuffle=False)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.ReLU(), nn.Linear(8, 2))
    optimizer = sgd(model, 0.1, 0.9, 1e-4)
    resume = ResumeFile(tmp_path / "resume.pt", fingerprint, announce=lambda line: None)
    history = fit(model, train, test, optimizer, runtime=Runtime(CPU, checkpoint_every=4), epochs=4, hooks=hooks,
                  scheduler=milestone_schedule(optimizer, [2], 0.1), resume=resume)
    return model, history


def test_a_run_resumed_after_a_crash_mid_epoch_equals_an_uninterrupted_one(tmp_path):
    """Step 9 is mid-epoch 2 (6 batches an epoch); the last resume file is from step 8, so step 9 is redone
    with the same data order, dropout draws and momentum."""
    reference, reference_history = shuffled_run(tmp_path / "reference", CrashAfter())
    with pytest.raises(Crash):
        shuffled_run(tmp_path, CrashAfter(crash_at=9))
    saved = torch.load(tmp_path / "resume.pt", weights_only=True)
    assert (saved["step"], saved["epoch"], saved["batch"]) == (8, 2, 2)
    resumed, history = shuffled_run(tmp_path, CrashAfter())
    assert [replace(r, seconds=0) for r in history] == [replace(r, seconds=0) for r in reference_history]
    for name, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_resume_file_of_another_fingerprint_or_corrupted_is_discarded(tmp_path):
    with pytest.raises(Crash):
        shuffled_run(tmp_path, CrashAfter(crash_at=9))
    messages = []
    resume = ResumeFile(tmp_path / "resume.pt", "other", announce=messages.append)
    assert resume.load() is None and "written under other settings" in messages[0]
    (tmp_path / "resume.pt").write_bytes(b"not a checkpoint")
    assert ResumeFile(tmp_path / "resume.pt", "same", announce=messages.append).load() is None
    assert "not a readable resume file" in messages[1]


def test_nan_found_at_a_checkpoint_keeps_the_previous_resume_file(tmp_path):
    """The loss is checked before every resume checkpoint, so a diverged state is never saved."""
    inputs = torch.randn(64, 4)
    batches = [(inputs[:16], torch.zeros(16, dtype=torch.long)), (inputs[16:32], torch.zeros(16, dtype=torch.long)),
               (torch.full((16, 4), float("nan")), torch.zeros(16, dtype=torch.long))]
    model = nn.Linear(4, 2)
    resume = ResumeFile(tmp_path / "resume.pt", "x", announce=lambda line: None)
    with pytest.raises(TrainingError, match="by step 3 .*last good resume checkpoint is kept"):
        fit(model, batches, batches, sgd(model, 0.1, 0.0, 0.0), runtime=Runtime(CPU, checkpoint_every=1), epochs=1,
            resume=resume)
    assert torch.load(tmp_path / "resume.pt", weights_only=True)["step"] == 2
