"""Multi-process training: a stage asked for `trainer.devices: 2` relaunches itself under torchrun (gloo on CPU)
and trains with DistributedDataParallel; its result equals a one-process run with the same global batch, and only
the main process writes files and tracks."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch

from tiny_repo import make_repo, run

# No BatchNorm (per-process batch statistics would legitimately differ), so both runs compute the same function.
SETTINGS = {"model.name": "mlp7_linear", "model.options": {}, "pretrain.epochs": 2, "pretrain.milestones": [1],
            "pretrain.lr": 0.05, "prune.layers": ["layers.[0-5]"], "prune.ratio": 0.5, "prune.reg.delta": 0.25,
            "prune.reg.stabilize_steps": 20, "trainability.jsv_samples": 0}
TOLERANCE = 1e-3


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def max_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max((first[key].float() - second[key].float()).abs().max().item() for key in first)


def stage_runs(repo: Path, stage: str) -> int:
    with sqlite3.connect(repo / "mlflow.db") as connection:
        return connection.execute("SELECT COUNT(*) FROM runs WHERE name = ?", (stage,)).fetchone()[0]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("distributed"), SETTINGS)


@pytest.mark.slow  # a stage run once alone and once under torchrun with 2 processes: about 1 min each
@pytest.mark.parametrize("stage, output", [("pretrain", "models/dense.pt"), ("prune", "models/pruned.pt")])
def test_two_processes_equal_one_with_the_same_global_batch(repo: Path, stage: str, output: str) -> None:
    tracking = {"MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    _, single_log = run(["python", f"stages/{stage}.py"], repo, **tracking)
    single = weights(repo / output)
    runs_before = stage_runs(repo, stage)
    _, log = run(["python", f"stages/{stage}.py", "trainer.devices=2"], repo, **tracking)
    assert max_difference(single, weights(repo / output)) < TOLERANCE
    epoch_lines = [line for line in log.splitlines() if line.startswith(f"[{stage}] epoch")]
    assert len(epoch_lines) == len([line for line in single_log.splitlines() if line.startswith(f"[{stage}] epoch")])
    assert stage_runs(repo, stage) == runs_before + 1, "only the main process tracks"
    assert not (repo / "resume").exists() or not any((repo / "resume").iterdir())


def test_more_processes_than_gpus_is_refused_before_any_work(repo: Path) -> None:
    code, log = run(["python", "stages/pretrain.py", "trainer.devices=2", "device=cuda"], repo, check=False)
    assert code == 2 and "no CUDA GPU" in log and "Traceback" not in log
