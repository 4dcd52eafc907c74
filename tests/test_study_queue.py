"""Parameter sweeps with DVC's queue (`dvc exp run --queue` + `dvc queue start -j 2`): the queued experiments run
side by side, and each stage takes its share of the cores instead of the whole machine (pipeline.threads)."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import List, Tuple

import pytest

from tiny_repo import environment, make_repo

THREADS_LINE = re.compile(r"\[threads\] (\w+): (\d+) thread\(s\) \((\d+) cores / (\d+) pipeline job\(s\) running\)")


def dvc(repo: Path, *arguments: str, env: dict) -> str:
    result = subprocess.run(["dvc", *arguments], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"dvc {' '.join(arguments)} failed:\n{result.stdout}{result.stderr}"
    return result.stdout + result.stderr


@pytest.mark.slow  # two whole tiny pipelines through DVC's queue
def test_dvc_queue_with_two_workers_shares_the_cores(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    jobs_folder = tmp_path / "tmp"
    jobs_folder.mkdir()
    env = environment(PYTHONPATH=str(repo), TMPDIR=str(jobs_folder))   # a registry of running jobs of its own
    env.pop("OMP_NUM_THREADS", None)                                   # the share is the pipeline's to decide
    for ratio in ("0.3", "0.7"):
        dvc(repo, "exp", "run", "--queue", "-S", f"prune.ratio={ratio}", env=env)
    # The queue's workers outlive `dvc queue start` and would hold a captured pipe open: no capture here.
    subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True, timeout=300)
    deadline = time.monotonic() + 1500
    while time.monotonic() < deadline:
        status = dvc(repo, "queue", "status", env=env)
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    dvc(repo, "queue", "stop", env=env)
    names = re.findall(r"^(\S+)\s+\S+\s+\S+.*Success", status, flags=re.MULTILINE)
    assert len(names) == 2, status

    shares: List[Tuple[str, int, int, int]] = []
    for name in names:
        log = dvc(repo, "queue", "logs", name, env=env)
        shares += [(stage, int(threads), int(cores), int(jobs)) for stage, threads, cores, jobs in
                   THREADS_LINE.findall(log)]
    assert {stage for stage, *_ in shares} >= {"pretrain", "prune", "retrain"}, shares
    cores = shares[0][2]
    assert all(threads == max(1, cores // jobs) for _, threads, _, jobs in shares), shares
    # Each experiment's pretrain started while the other's ran: at least the later one counted both.
    pretrains = [share for share in shares if share[0] == "pretrain"]
    assert len(pretrains) == 2 and max(jobs for *_, jobs in pretrains) >= 2, pretrains
    summaries = json.loads(dvc(repo, "exp", "show", "--json", env=env))
    assert summaries, "no experiment results"
