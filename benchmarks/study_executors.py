"""Benchmark: one study grid under the serial executor and under Ray, side by side in one run. A measurement
script, not a test: it prints figures (and writes them as JSON with --json) and asserts nothing.

    .venv/bin/python benchmarks/study_executors.py [--workers 2] [--pretrain-epochs 1] [--retrain-epochs 2]
        [--serial-threads N] [--json PATH]

The grid is 2 methods × 2 ratios × 2 retraining schedules × 1 seed = 8 cells (1 dense, 4 pruned networks) of the
default ResNet56 on the embedded digits, in a temporary folder. Serial runs first with its usual thread count (the
machine's cores unless --serial-threads or OMP_NUM_THREADS says otherwise); Ray then runs the same grid from an
empty cache with --workers CPUs, one per task, one torch thread each. Reported:

* wall time of each and their ratio (Ray's includes starting Ray);
* Ray's start time;
* Ray's per-task overhead: the round trip of an empty task with the study's task options (measured after the study,
  on the warm Ray), and the worker time not spent inside a task, per task: (wall after start × workers − Σ task
  durations) / tasks; it includes the idleness the DAG forces (while the single dense network trains, the other
  workers wait) and the driver's MLflow logging.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def write_study(folder: Path, pretrain_epochs: int, retrain_epochs: int) -> Path:
    spec = {"name": "bench", "base": "params.yaml",
            "settings": {"pretrain.epochs": pretrain_epochs, "pretrain.milestones": [], "prune.reg.delta": 0.5,
                         "prune.reg.stabilize_steps": 2, "retrain.epochs": retrain_epochs, "retrain.milestones": [],
                         "trainability.jsv_samples": 4},
            "methods": {"TPP": {"prune.method": "tpp"}, "L1": {"prune.method": "l1"}}, "ratios": [0.5, 0.9],
            "retrain": {"fast": {"retrain.lr": 0.01}, "slow": {"retrain.lr": 0.001}}, "seeds": [0]}
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def empty_task() -> None:
    """What a task costs with nothing in it."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="Ray CPUs (one task each)")
    parser.add_argument("--pretrain-epochs", type=int, default=1)
    parser.add_argument("--retrain-epochs", type=int, default=2)
    parser.add_argument("--serial-threads", type=int, default=None, help="torch threads of the serial run")
    parser.add_argument("--json", type=Path, default=None)
    arguments = parser.parse_args()

    from pipeline.data import materialize_digits
    from pipeline.study.runner import run_study
    from pipeline.study.ray_executor import TASK_LOG, start_ray

    folder = Path(tempfile.mkdtemp(prefix="study-bench-"))
    (folder / "params.yaml").write_text((REPO / "params.yaml").read_text())
    materialize_digits(folder / "data")
    os.chdir(folder)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder}/mlflow.db"
    study = write_study(folder, arguments.pretrain_epochs, arguments.retrain_epochs)

    if arguments.serial_threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(arguments.serial_threads)
    started = time.perf_counter()
    run_study(study, folder / "serial", root=folder)
    serial = time.perf_counter() - started

    os.environ["OMP_NUM_THREADS"] = "1"
    started = time.perf_counter()
    start_ray(None, num_cpus=arguments.workers, num_gpus=0)
    ray_start = time.perf_counter() - started
    run_study(study, folder / "ray", root=folder, executor="ray", cpus_per_task=1)
    ray_wall = time.perf_counter() - started

    import ray
    remote = ray.remote(empty_task).options(num_cpus=1, max_retries=1, retry_exceptions=False)
    ray.get(remote.remote())
    trips = []
    for _ in range(20):
        tick = time.perf_counter()
        ray.get(remote.remote())
        trips.append(time.perf_counter() - tick)
    ray.shutdown()

    tasks = [json.loads(line) for line in (folder / "ray" / TASK_LOG).read_text().splitlines()]
    busy = sum(task["end"] - task["start"] for task in tasks)
    idle_per_task = ((ray_wall - ray_start) * arguments.workers - busy) / len(tasks)
    same = (folder / "ray" / "cells.csv").read_bytes() == (folder / "serial" / "cells.csv").read_bytes()
    figures: Dict[str, Any] = {
        "cells": 8, "tasks": len(tasks), "workers": arguments.workers, "cpu_count": os.cpu_count(),
        "load_average_1min_at_end": os.getloadavg()[0], "serial_s": round(serial, 1), "ray_s": round(ray_wall, 1),
        "ray_over_serial": round(ray_wall / serial, 3), "ray_start_s": round(ray_start, 1),
        "empty_task_round_trip_s": round(statistics.median(trips), 4),
        "worker_time_outside_tasks_per_task_s": round(idle_per_task, 2),
        "task_seconds": {kind: round(sum(t["end"] - t["start"] for t in tasks if t["kind"] == kind), 1)
                         for kind in ("dense", "pruned", "cell")},
        "cells_csv_identical_to_serial": same, "folder": str(folder)}
    print(json.dumps(figures, indent=1))
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
