"""The shared training loop: it learns, honours step budgets and hooks, stops on a diverged loss, and resumes
exactly where a crashed run stopped."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from torch.utils.data import Dataset

from pipeline.config import DataConfig, RegularizerConfig
from pipeline.data import TensorBatches
from pipeline.data.batches import ImageTransform
from pipeline.data.feeding import dataloaders
from pipeline.data.spec import Feed
from pipeline.errors import TrainingError
from pipeline.measure.jacobian import JacobianProbe
from pipeline.pruning.regularizer import TPPRegularizer
from pipeline.runtime import Runtime
from pipeline.training import state
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
    written every 4 steps."""
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


# Kill positions, in-process: the test hook `kill_point` raises `Killed` where a real run would be SIGKILLed.
# 90 samples in batches of 16: 6 steps an epoch. With checkpoints every 5 steps the resume files are written at
# steps 5, 6 (end of epoch 1), 10, 12 (end of epoch 2), 15, 18 (end of epoch 3), 20 and 24 (21 for prune).
# Each case: (kill label, checkpoint_every, (step, epoch, batch) of the resume file the next run continues from,
# per phase where they differ).
KILL_POSITIONS = {
    "mid-epoch between step checkpoints": ("step:17", 5, (15, 3, 3)),
    "right after a step checkpoint": ("checkpoint:15", 5, (15, 3, 3)),
    "right after an epoch-end checkpoint": ("epoch_end:2", 5, (12, 3, 0)),
    "during the epoch-end evaluation": ("evaluate:3", 5, (15, 3, 3)),
    "during the evaluation after a checkpoint at the epoch's last step": ("evaluate:3", 9, (18, 3, 6)),
    "during the last evaluation after a checkpoint at the last step": (
        "evaluate:4", 3, {"pretrain": (24, 4, 6), "prune": (21, 4, 3), "retrain": (24, 4, 6)}),
    "while the resume file is written (partial temporary file)": ("step:20", 5, (18, 4, 0)),
    "while the resume file is written (truncated file)": ("checkpoint:15", 5, None),
}
PHASES = ("pretrain", "prune", "retrain")


class Killed(BaseException):
    """A SIGKILL in-process: a BaseException, so nothing on the way treats it as an ordinary error."""


class FlippedImages(Dataset):
    """8×8 images, with `augment` flipped at random by torch's RNG: DataLoader augmentation a resume must replay."""

    def __init__(self, images, targets, augment):
        self.images, self.targets, self.augment = images, targets, augment

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        image = self.images[index]
        return (image.flip(-1) if self.augment and torch.rand(()) < 0.5 else image), self.targets[index]


def image_batches(loader):
    """Train (shuffled, augmented) and test batches of 90 seeded 8×8 images, served the way `loader` says."""
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (90, 1, 8, 8), dtype=torch.uint8, generator=generator)
    targets = (pixels[:, 0, :4].float().mean(dim=(1, 2)) > pixels[:, 0, 4:].float().mean(dim=(1, 2))).long()
    images = pixels.float() / 255
    if loader == "tensor":
        return (TensorBatches(images, targets, 16, shuffle=True, seed=3),
                TensorBatches(images, targets, 45, shuffle=False))
    if loader == "device":
        common = dict(mean=[0.5], std=[0.25], channels=1)
        return (TensorBatches(pixels, targets, 16, shuffle=True, seed=3,
                              transform=ImageTransform(augment=True, **common)),
                TensorBatches(pixels, targets, 45, shuffle=False, transform=ImageTransform(augment=False, **common)))
    feed = Feed(batch_size=16, seed=3, device=CPU)
    return dataloaders(FlippedImages(images, targets, True), FlippedImages(images, targets, False),
                        DataConfig(num_workers=1, eval_batch_size=45), feed)


def small_cnn():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(8, 2))


def phase_run(folder, phase, checkpoint_every=5, loader="tensor"):
    """One training phase as its stage runs it: `pretrain` (SGD + step schedule, 4 epochs), `prune` (TPP's
    regularizer as hooks, 21 steps: the 4th epoch is partial and the schedule ends it) or `retrain` (step
    schedule, mean JSV measured after every epoch). Returns the trained weights, the history (wall time zeroed)
    and the hooks' state."""
    torch.manual_seed(0)
    train, test = image_batches(loader)
    model = small_cnn()
    optimizer = sgd(model, 0.05, 0.9, 1e-4)
    schedule = dict(epochs=4, scheduler=milestone_schedule(optimizer, [2], 0.1))
    if phase == "prune":
        config = RegularizerConfig(alpha=10.0, delta=0.25, interval=1, max_lambda=1.0, stabilize_steps=17)
        hooks = TPPRegularizer(model, {"0": torch.tensor([1, 5]), "3": torch.tensor([2])}, torch.zeros(1, 1, 8, 8),
                               config)
        schedule = dict(max_steps=hooks.schedule.total_steps)
    else:
        hooks = JacobianProbe(next(iter(test))[0][:4]) if phase == "retrain" else None
    resume = ResumeFile(folder / "resume.pt", "same", announce=lambda line: None)
    history = fit(model, train, test, optimizer, runtime=Runtime(CPU, checkpoint_every=checkpoint_every),
                  hooks=hooks, stage=phase, resume=resume, **schedule)
    return model.state_dict(), [replace(record, seconds=0) for record in history], \
        (hooks.state_dict() if hooks is not None else {})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Each phase run once without a kill, checkpointing every 5 steps (the interval changes no result, so the
    9-step case compares with these too)."""
    return {phase: phase_run(tmp_path_factory.mktemp(phase), phase) for phase in PHASES}


@pytest.fixture
def kill_at(monkeypatch):
    """Arm the library's test hook for one kill position; it raises `Killed` instead of sending SIGKILL."""
    def killed():
        raise Killed()
    monkeypatch.setattr(state, "kill", killed)
    return lambda stage, label: monkeypatch.setenv(state.KILL_AT_VARIABLE, f"{stage}:{label}")


def kill_and_resume(tmp_path, monkeypatch, kill_at, phase, label, checkpoint_every, loader="tensor"):
    """Run until the kill, check the resume file is the expected one, then rerun with the kill disarmed."""
    kill_at(phase, label)
    with pytest.raises(Killed):
        phase_run(tmp_path, phase, checkpoint_every, loader)
    monkeypatch.delenv(state.KILL_AT_VARIABLE)
    saved = torch.load(tmp_path / "resume.pt", weights_only=True)
    return (saved["step"], saved["epoch"], saved["batch"]), saved


def assert_same_outputs(resumed, reference):
    weights, history, hooks = resumed
    assert history == reference[1]
    assert hooks == reference[2]
    assert weights.keys() == reference[0].keys()
    for name, value in reference[0].items():
        assert torch.equal(weights[name], value), name


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("position", list(KILL_POSITIONS))
def test_a_run_killed_at_any_position_resumes_to_identical_outputs(tmp_path, monkeypatch, kill_at, uninterrupted,
                                                                    phase, position):
    """Every kind of kill position, in each phase: the resumed run's weights, per-epoch history and schedule
    position equal the uninterrupted run's exactly (CPU)."""
    label, checkpoint_every, expected = KILL_POSITIONS[position]
    where, saved = kill_and_resume(tmp_path, monkeypatch, kill_at, phase, label, checkpoint_every)
    if expected is None:  # a torn resume file (a filesystem without atomic rename): discarded, training restarts
        (tmp_path / "resume.pt").write_bytes((tmp_path / "resume.pt").read_bytes()[:4096])
    else:
        assert where == (expected[phase] if isinstance(expected, dict) else expected)
    if "partial temporary file" in position:  # the kill came as the next save began, halfway through its write
        (tmp_path / ".resume.pt.tmp").write_bytes((tmp_path / "resume.pt").read_bytes()[:4096])
    assert_same_outputs(phase_run(tmp_path, phase, checkpoint_every), uninterrupted[phase])
    assert not (tmp_path / ".resume.pt.tmp").exists()


@pytest.mark.parametrize("label, expected", [("epoch_end:2", (12, 3, 0)), ("step:17", (15, 3, 3))],
                         ids=["epoch-boundary", "mid-epoch"])
@pytest.mark.parametrize("loader", ["device", "workers"])
def test_other_loaders_resume_with_identical_outputs(tmp_path, monkeypatch, kill_at, loader, label, expected):
    """The device loader (order, crops and flips from one generator) and a DataLoader with a worker process
    (order from its sampler's generator, augmentation seeded per sample) replay the interrupted epoch's draws and
    continue with the next epoch's."""
    reference = phase_run(tmp_path / "reference", "pretrain", loader=loader)
    where, _ = kill_and_resume(tmp_path, monkeypatch, kill_at, "pretrain", label, 5, loader)
    assert where == expected
    assert_same_outputs(phase_run(tmp_path, "pretrain", loader=loader), reference)


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
