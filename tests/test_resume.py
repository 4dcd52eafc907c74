"""Long runs survive a kill: real `dvc repro` runs are killed with SIGKILL, and the next `dvc repro` continues from
the resume checkpoint and writes byte-identical outputs (CPU).

Kills land at exact positions through the library's test hook (`pipeline.training.state.kill_point`, armed by
`TPP_PIPELINE_TEST_KILL_AT`), so no test depends on timing; one test kills the whole process group at a moment
picked by watching the resume file, as a user would. The in-process versions of every position, fast, are in
tests/test_train.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

import pytest
import torch

from pipeline.training.state import KILL_AT_VARIABLE
from test_data import write_mnist
from tiny_repo import TINY, environment, locked_outputs, make_repo, run, set_params

# Slow (minutes): real `dvc repro` runs killed mid-stage and rerun.
# `make test-slow` and CI run them.
pytestmark = pytest.mark.slow

# Long enough that a kill lands mid-epoch: 23 steps an epoch, resume files every 3 steps and at epoch ends (steps
# 23, 46, 69). pretrain: 2 epochs (46 steps); prune regularizes for 4 + 40 steps (its 2nd epoch is partial);
# retrain: 3 epochs (69 steps, so a step checkpoint falls on the last batch).
LONGER = {**TINY, "prune.reg.stabilize_steps": 40, "retrain.epochs": 3, "retrain.milestones": [2],
          "trainer.checkpoint_every": 3}
# Outputs holding measured time (latency, and the summary that quotes its speed-ups), which differ between runs.
TIMED_OUTPUTS = {"reports", "metrics/latency.json", "metrics/summary.json"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = make_repo(tmp_path_factory.mktemp("resume"), LONGER)
    run(["dvc", "repro"], root)
    return root


def kill_mid_epoch(repo: Path, stage: str, command: Sequence[str] = ("dvc", "repro")) -> dict:
    """Start `command`, SIGKILL its whole process group (DVC and the stage) as soon as the stage's resume file is
    from the middle of an epoch, and return what the resume file holds after the kill."""
    resume = repo / "resume" / f"{stage}.pt"
    process = subprocess.Popen(list(command), cwd=repo, start_new_session=True,
                               env=environment(PYTHONPATH=str(repo)), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    state = None
    while time.monotonic() < deadline and process.poll() is None:
        state = read_resume(resume)
        if state is not None and state["batch"] > 0:
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert state is not None and state["batch"] > 0, f"{stage} ended before a mid-epoch resume file was written"
    # The stage may have written a later file between that read and the kill (3 steps take ~0.1 s here): the
    # next run resumes from what the kill left on disk.
    return read_resume(resume)


def read_resume(path: Path):
    """The resume file's state, or None while it does not exist (it only ever appears whole: atomic rename)."""
    try:
        return torch.load(path, weights_only=True)
    except FileNotFoundError:
        return None


@pytest.mark.parametrize("stage, change", [("prune", {"prune.reg.alpha": 900.0}), ("retrain", {"retrain.lr": 0.02})])
def test_kill_mid_epoch_then_repro_resumes_with_identical_outputs(repo: Path, stage: str, change: dict) -> None:
    """A new experiment killed mid-epoch: the next `dvc repro` continues it, and its outputs equal those of an
    uninterrupted run with the same settings."""
    set_params(repo, change)
    state = kill_mid_epoch(repo, stage)
    _, output = run(["dvc", "repro"], repo)
    assert f"[{stage}] resuming from resume/{stage}.pt: step {state['step']}" in output
    assert not (repo / "resume" / f"{stage}.pt").exists(), "the resume file is removed once outputs are written"
    resumed = locked_outputs(repo)
    run(["dvc", "repro", "--single-item", "--force", stage], repo)
    assert locked_outputs(repo) == resumed


def test_two_full_runs_write_identical_bytes(repo: Path) -> None:
    """Same params, same machine, CPU: a forced rerun of every stage changes no output but the measured times."""
    before = locked_outputs(repo)
    run(["dvc", "repro", "-f"], repo)
    after = locked_outputs(repo)
    assert {path: digest for path, digest in after.items() if path not in TIMED_OUTPUTS} == \
        {path: digest for path, digest in before.items() if path not in TIMED_OUTPUTS}


def test_resume_file_from_other_settings_is_discarded_with_a_message(repo: Path) -> None:
    kill_mid_epoch(repo, "prune", ("dvc", "repro", "--single-item", "--force", "prune"))
    set_params(repo, {"prune.reg.alpha": 500.0})
    _, output = run(["dvc", "repro", "prune"], repo)
    assert "discarding resume/prune.pt: it was written under other settings" in output
    assert "resuming" not in output


def test_diverged_loss_stops_naming_stage_step_and_knobs_and_keeps_the_last_good_checkpoint(repo: Path) -> None:
    """λ stays 0 for 5 steps (a good checkpoint at step 3), then α·λ = 2.5e29 blows the weights up."""
    pruned = (repo / "models" / "pruned.pt").read_bytes()
    code, output = run(["python", "stages/prune.py", "prune.reg.alpha=1e30", "prune.reg.interval=5"], repo, check=False)
    assert code == 2 and "Traceback" not in output
    assert "The prune loss became" in output and "by step" in output
    assert "prune.lr" in output and "prune.reg.alpha" in output and "prune.reg.delta" in output
    kept = torch.load(repo / "resume" / "prune.pt", weights_only=True)
    assert all(torch.isfinite(value).all() for value in kept["model"].values() if value.is_floating_point())
    assert (repo / "models" / "pruned.pt").read_bytes() == pruned, "no output is written by a diverged stage"
    (repo / "resume" / "prune.pt").unlink()


# Every kind of kill position, one after another in the same stage: each run is killed at the next position and
# the following one resumes from the file the kill left. (kill label, torn write to leave behind, the resume
# file's (step, epoch, batch) after the kill; None: the file is torn, so the next run starts over).
KILL_CHAIN = [
    ("checkpoint:3", "truncated file", None),  # torn resume file (a filesystem without atomic rename)
    ("step:8", None, (6, 1, 6)),  # mid-epoch between step checkpoints
    ("checkpoint:12", None, (12, 1, 12)),  # right after a step checkpoint
    ("step:15", "partial temporary file", (12, 1, 12)),  # while the step-15 file is being written
    ("evaluate:1", None, (21, 1, 21)),  # during the epoch-end evaluation
    ("epoch_end:1", None, (23, 2, 0)),  # right after the epoch-end checkpoint, before the next epoch's first batch
]
# retrain's 3rd epoch ends on a step checkpoint: killed during its evaluation, the run resumes after the last batch.
EXTRA_KILLS = {"retrain": [("evaluate:3", None, (69, 3, 23))]}


def kill_at(repo: Path, stage: str, label: str, command: Sequence[str]) -> tuple:
    """Run `command` with the kill hook armed at `<stage>:<label>`; return its output and the position (step,
    epoch, batch) of the resume file the kill left (None if there is none)."""
    code, output = run(command, repo, check=False, **{KILL_AT_VARIABLE: f"{stage}:{label}"})
    assert code != 0, f"{stage} was not killed at {label}:\n{output[-2000:]}"
    state = read_resume(repo / "resume" / f"{stage}.pt")
    return output, None if state is None else (state["step"], state["epoch"], state["batch"])


def leave_torn_write(resume: Path, torn: str) -> None:
    """What a kill in the middle of writing `resume` leaves: with the atomic write, the previous file and a partial
    temporary one; on a filesystem without atomic rename, the file itself cut short."""
    partial = resume.read_bytes()[:4096]
    (resume.with_name(f".{resume.name}.tmp") if torn == "partial temporary file" else resume).write_bytes(partial)


def assert_started_from(output: str, stage: str, position: Optional[tuple]) -> None:
    """The run said it resumed from `position`, or (None) started from the beginning without resuming."""
    if position is None:
        assert "resuming from" not in output, output[-2000:]
    else:
        step, epoch, batch = position
        assert f"[{stage}] resuming from resume/{stage}.pt: step {step}, epoch {epoch}, batch {batch}\n" in output, \
            output[-2000:]


def assert_outputs_equal(repo: Path, files: Sequence[str], expected: Mapping[str, bytes]) -> None:
    for name in files:
        assert (repo / name).read_bytes() == expected[name], f"{name} differs from the uninterrupted run's"


@pytest.mark.parametrize("stage", ["pretrain", "prune", "retrain"])
def test_kills_at_every_position_then_repro_writes_identical_outputs(repo: Path, stage: str) -> None:
    """A stage killed at each kind of position in turn (a torn resume file, mid-epoch, right after a step
    checkpoint, while a checkpoint is being written, during the evaluation, right after an epoch-end checkpoint):
    every `dvc repro` continues from the right file, and the last one writes the same bytes as an uninterrupted
    run."""
    run(["dvc", "repro"], repo)
    uninterrupted = locked_outputs(repo)
    resume = repo / "resume" / f"{stage}.pt"
    resume.unlink(missing_ok=True)
    command = ["dvc", "repro", "--single-item", "--force", stage]
    start: Optional[tuple] = None
    discarded = False
    for label, torn, position in KILL_CHAIN + EXTRA_KILLS.get(stage, []):
        output, found = kill_at(repo, stage, label, command)
        assert_started_from(output, stage, start)
        assert discarded == (f"discarding resume/{stage}.pt: it is not a readable resume file" in output)
        if torn == "truncated file":
            leave_torn_write(resume, torn)
        else:
            assert found == position, f"the resume file after a kill at {label}"
            if torn is not None:
                leave_torn_write(resume, torn)
        start, discarded = position, torn == "truncated file"
    _, output = run(command, repo)
    assert_started_from(output, stage, start)
    assert not resume.exists() and not resume.with_name(f".{resume.name}.tmp").exists()
    assert locked_outputs(repo) == uninterrupted


# One kill position (right after an epoch-end checkpoint) under two processes and with DataLoader workers: the
# pretrain stage run directly in a copy of its own, since these settings change what every stage depends on.
PRETRAIN_OUTPUTS = ("models/dense.pt", "metrics/pretrain.json", "plots/pretrain.csv")
MNIST = ["data.name=mnist", "data.loader=workers", "data.num_workers=1", "pretrain.batch_size=16",
         "data.eval_batch_size=16", "pretrain.epochs=2"]


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    root = make_repo(tmp_path_factory.mktemp("resume-plain"), {**TINY, "trainer.checkpoint_every": 3})
    write_mnist(root / "data", train_count=96, test_count=16)
    return root


@pytest.mark.parametrize("overrides, position", [
    (["trainer.devices=2"], (23, 2, 0)),  # digits: 23 global batches an epoch, each split over 2 processes (gloo)
    (MNIST, (6, 2, 0)),  # 96 images in batches of 16, loaded by a worker process
], ids=["two-processes", "dataloader-workers"])
def test_kill_right_after_an_epoch_end_checkpoint_under_torchrun_and_with_workers(plain: Path, overrides: list,
                                                                               position: tuple) -> None:
    command = ["python", "stages/pretrain.py", *overrides]
    run(command, plain)
    uninterrupted = {name: (plain / name).read_bytes() for name in PRETRAIN_OUTPUTS}
    _, found = kill_at(plain, "pretrain", "epoch_end:1", command)
    assert found == position
    _, output = run(command, plain)
    assert_started_from(output, "pretrain", position)
    assert_outputs_equal(plain, PRETRAIN_OUTPUTS, uninterrupted)
