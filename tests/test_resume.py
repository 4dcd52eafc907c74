"""Long runs survive a kill: a real `dvc repro` is killed with SIGKILL in the middle of an epoch, and the next
`dvc repro` continues from the resume checkpoint and writes byte-identical outputs (CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.tiny_repo import environment, locked_outputs, make_repo, run, set_params, stages_ran, TINY

# Long enough that a kill lands mid-epoch: the prune stage regularizes for 4 + 40 steps (23 steps an epoch).
LONGER = {**TINY, "prune.reg.stabilize_steps": 40, "retrain.epochs": 3, "retrain.milestones": [2],
          "trainer.checkpoint_every": 3}
# Outputs holding measured time, which differ between any two runs.
TIMED_OUTPUTS = {"reports", "metrics/latency.json"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = make_repo(tmp_path_factory.mktemp("resume"), LONGER)
    run(["dvc", "repro"], root)
    return root


def kill_mid_epoch(repo: Path, stage: str) -> dict:
    """Start `dvc repro -s -f <stage>`, SIGKILL its whole process group as soon as the stage's resume file is
    from the middle of an epoch, and return what that file held."""
    resume = repo / "resume" / f"{stage}.pt"
    process = subprocess.Popen(["dvc", "repro", "-s", "-f", stage], cwd=repo, start_new_session=True,
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


@pytest.mark.parametrize("stage", ["prune", "retrain"])
def test_kill_mid_epoch_then_repro_resumes_with_identical_outputs(repo: Path, stage: str) -> None:
    before = locked_outputs(repo)
    state = kill_mid_epoch(repo, stage)
    # --no-run-cache: the fixture's run of these very settings is in DVC's run cache, which a user continuing a
    # killed first run would not have; without it DVC would restore that run's outputs instead of resuming.
    _, output = run(["dvc", "repro", "--no-run-cache"], repo)
    assert f"[{stage}] resuming from resume/{stage}.pt: step {state['step']}" in output
    assert stages_ran(output) == {stage}, "identical outputs leave every later stage up to date"
    assert locked_outputs(repo) == before
    assert not (repo / "resume" / f"{stage}.pt").exists(), "the resume file is removed once outputs are written"


def test_two_full_runs_write_identical_bytes(repo: Path) -> None:
    """Same params, same machine, CPU: a forced rerun of every stage changes no output but the measured times."""
    before = locked_outputs(repo)
    run(["dvc", "repro", "-f"], repo)
    after = locked_outputs(repo)
    assert {path: digest for path, digest in after.items() if path not in TIMED_OUTPUTS} == \
        {path: digest for path, digest in before.items() if path not in TIMED_OUTPUTS}


def test_resume_file_from_other_settings_is_discarded_with_a_message(repo: Path) -> None:
    kill_mid_epoch(repo, "prune")
    set_params(repo, {"prune.reg.alpha": 500.0})
    try:
        _, output = run(["dvc", "repro", "--no-run-cache", "prune"], repo)
    finally:
        set_params(repo, {"prune.reg.alpha": LONGER.get("prune.reg.alpha", 1000.0)})
    assert "discarding resume/prune.pt: it was written under other settings" in output
    assert "resuming" not in output


def test_diverged_loss_stops_naming_stage_step_and_knobs_and_keeps_the_last_good_checkpoint(repo: Path) -> None:
    pruned = (repo / "models" / "pruned.pt").read_bytes()
    code, output = run(["python", "stages/prune.py", "prune.reg.alpha=1e30", "prune.lr=10"], repo, check=False)
    assert code == 2 and "Traceback" not in output
    assert "The prune loss became" in output and "by step" in output
    assert "prune.lr" in output and "prune.reg.alpha" in output and "prune.reg.delta" in output
    kept = torch.load(repo / "resume" / "prune.pt", weights_only=True)
    assert all(torch.isfinite(value).all() for value in kept["model"].values() if value.is_floating_point())
    assert (repo / "models" / "pruned.pt").read_bytes() == pruned, "no output is written by a diverged stage"
    (repo / "resume" / "prune.pt").unlink()
