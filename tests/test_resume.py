"""Long runs survive a kill: a real `dvc repro` is killed with SIGKILL in the middle of an epoch, and the next
`dvc repro` continues from the resume checkpoint and writes byte-identical outputs (CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Sequence

import pytest
import torch

from tiny_repo import TINY, environment, locked_outputs, make_repo, run, set_params

# Slow (minutes): real `dvc repro` runs killed mid-stage and rerun.
# `make test-slow` and CI run them.
pytestmark = pytest.mark.slow

# Long enough that a kill lands mid-epoch: the prune stage regularizes for 4 + 40 steps (23 steps an epoch).
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
    from the middle of an epoch, and return what that file held."""
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
    return state


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
