"""Each job takes its share of the cores (pipeline.threads): OMP_NUM_THREADS when set, else the cores divided by
the pipeline jobs alive on this machine, counted through lock files that die with their process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pipeline.threads as threads
from pipeline.threads import running_jobs, thread_share, use_thread_share

REPO = Path(__file__).resolve().parents[1]
HOLD = "import sys; from pathlib import Path; from pipeline.threads import running_jobs; " \
       "print(running_jobs(Path(sys.argv[1])), flush=True); sys.stdin.read()"


def job(folder: Path) -> subprocess.Popen:
    """Another pipeline job: registers in `folder`, says how many it counted, then waits until told to end."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=REPO, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env={"PYTHONPATH": str(REPO), "PATH": ""})
    process.stdout.readline()
    return process


def test_jobs_alive_are_counted_and_ended_ones_forgotten(tmp_path: Path) -> None:
    assert running_jobs(tmp_path) == 1
    others = [job(tmp_path), job(tmp_path)]
    assert running_jobs(tmp_path) == 3
    others[0].kill()
    others[0].wait()
    assert running_jobs(tmp_path) == 2
    assert len(list(tmp_path.iterdir())) == 2          # the killed job's file was removed
    others[1].stdin.close()
    others[1].wait()
    assert running_jobs(tmp_path) == 1


def test_the_share_is_omp_num_threads_else_cores_over_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert thread_share() == (3, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads, "JOBS_FOLDER", tmp_path)
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    monkeypatch.setattr(threads, "running_jobs", lambda folder=tmp_path: 3)
    assert thread_share()[0] == 2
    monkeypatch.setattr(threads, "running_jobs", lambda folder=tmp_path: 20)
    assert thread_share()[0] == 1                       # never zero
    before = torch.get_num_threads()
    try:
        assert use_thread_share("pretrain") == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
