"""Studies under `--executor ray`: the same cells as the serial executor, the DAG built once per piece, one GPU per
running task, the driver as the only MLflow writer, resume after a killed driver, failures reported per cell, and a
private Ray that listens on 127.0.0.1 only.

One Ray (2 CPUs, 2 pretend GPUs), started the way a study starts its private one, is shared by the module:
starting one takes 5-15 s on 2 cores. `ray` is imported only after that start, which must configure it first.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List

import psutil
import pytest
import torch
from mlflow import MlflowClient

from pipeline.data import materialize_digits
from pipeline.errors import ConfigError, PipelineError
from pipeline.study.runner import run_study
from pipeline.study.ray_executor import LOCAL_ONLY_VARIABLE, TASK_LOG, start_ray, task_shape
from test_study import write_study

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The study's own private start with 2 CPUs and 2 logical GPUs; workers get an MLflow store of their own,
    which must stay unwritten (the driver is the only writer). Yields that store's path."""
    worker_store = tmp_path_factory.mktemp("workers") / "mlflow.db"
    previous = {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "MLFLOW_TRACKING_URI")}
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{worker_store}"   # inherited by Ray's processes
    started = start_ray(None, num_cpus=2, num_gpus=2)
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    yield worker_store
    if started:
        import ray
        ray.shutdown()


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with params.yaml and the digits data; the driver's MLflow store is in it; one torch thread, as
    each Ray task gets (its CPU share), so serial and Ray numerics match."""
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    materialize_digits(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


def tasks(output: Path) -> List[Dict[str, Any]]:
    log = output / TASK_LOG
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def cell_runs(project: Path) -> List[Any]:
    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tpp-study-tiny").experiment_id])
    return [run for run in runs if "mlflow.parentRunId" in run.data.tags and run.info.run_name != "report"]


@pytest.mark.slow  # starts Ray (5-15 s on 2 busy cores); the slow tests below share that start
def test_a_private_ray_listens_on_loopback_only(local_ray: Path) -> None:
    import ray

    assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert all(node["NodeManagerAddress"] == "127.0.0.1" for node in ray.nodes())
    driver = psutil.Process()
    listening = [(process.name(), connection.laddr.ip)
                 for process in [driver, *driver.children(recursive=True)]
                 for connection in process.net_connections(kind="inet") if connection.status == psutil.CONN_LISTEN]
    assert {"gcs_server", "raylet"} <= {name for name, _ in listening}
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for _, ip in listening), listening
    assert os.environ[LOCAL_ONLY_VARIABLE] == "0"


@pytest.mark.parametrize("device, resources, cpus, gpus, expected", [
    ("auto", {"CPU": 16, "GPU": 8}, None, None, (2, 1.0)),
    ("auto", {"CPU": 2}, None, None, (1, 0.0)),
    ("cpu", {"CPU": 16, "GPU": 8}, None, None, (1, 0.0)),
    ("auto", {"CPU": 16, "GPU": 8}, 4, 0.5, (4, 0.5)),
])
def test_a_task_asks_for_one_gpu_where_there_are_gpus_else_one_core(device: str, resources: Dict[str, float],
                                                                    cpus: Any, gpus: Any, expected: Any) -> None:
    shape = task_shape(device, resources, cpus, gpus)
    assert (shape.num_cpus, shape.num_gpus) == expected


@pytest.mark.parametrize("device, resources, cpus, gpus, expected", [
    ("auto", {"CPU": 2}, None, 1, "--gpus-per-task 1 cannot be granted: the Ray cluster has 0 GPU(s)"),
    ("cpu", {"CPU": 2, "GPU": 2}, None, 1, "the study's device is 'cpu'"),
    ("auto", {"CPU": 2}, 3, None, "--cpus-per-task 3 cannot be granted: the Ray cluster has 2 CPU(s)"),
])
def test_a_task_shape_the_cluster_cannot_grant_is_refused(device: str, resources: Dict[str, float], cpus: Any,
                                                           gpus: Any, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        task_shape(device, resources, cpus, gpus)


def test_ray_options_without_the_ray_executor_are_refused(project: Path) -> None:
    with pytest.raises(ConfigError, match="only apply to --executor ray"):
        run_study(write_study(project), project / "out", root=project, address="auto")
    with pytest.raises(ConfigError, match="--executor 'dask' is not one of serial, ray"):
        run_study(write_study(project), project / "out", root=project, executor="dask")
    assert not (project / "out").exists()


@pytest.mark.slow  # a small grid twice (serial and Ray, a fresh worker process per GPU task), then a rerun
def test_ray_study_equals_the_serial_one_and_builds_each_piece_once(project: Path, local_ray: Path) -> None:
    study = write_study(project, methods={"TPP": {"prune.method": "tpp"}})   # 1 dense, 2 pruned, 4 cells
    serial = run_study(study, project / "serial", root=project)
    parallel = run_study(study, project / "ray", root=project, executor="ray")

    for table in ("cells.csv", "curves.csv"):
        assert (parallel / table).read_bytes() == (serial / table).read_bytes()
    ran = tasks(parallel)
    kinds = [task["kind"] for task in ran]
    assert (kinds.count("dense"), kinds.count("pruned"), kinds.count("cell")) == (1, 2, 4)
    assert {(task["kind"], task["cell"]) for task in ran if task["kind"] == "cell"} == {
        ("cell", run.info.run_name) for run in cell_runs(project)}
    assert all(len(task["gpu_ids"]) == 1 and task["cuda_visible_devices"] == task["gpu_ids"][0]
               and task["threads"] == 1 for task in ran)
    for first in ran:
        for second in ran:
            if first is not second and first["gpu_ids"] == second["gpu_ids"]:
                assert first["end"] <= second["start"] or second["end"] <= first["start"], (first, second)
    assert len({task["gpu_ids"][0] for task in ran}) == 2   # both GPUs were used

    by_study: Dict[str, List[str]] = {}
    for run in cell_runs(project):
        by_study.setdefault(run.data.tags["mlflow.parentRunId"], []).append(run.info.run_name)
    assert len(by_study) == 2 and all(len(names) == len(set(names)) == 4 for names in by_study.values())
    assert not local_ray.exists(), "a Ray worker wrote to MLflow"

    run_study(study, project / "ray", root=project, executor="ray")
    assert tasks(parallel) == ran, "a rerun of a finished study submitted tasks"
    assert (parallel / "cells.csv").read_bytes() == (serial / "cells.csv").read_bytes()


@pytest.mark.slow  # a grid with a diverging schedule
def test_a_failing_cell_is_reported_with_its_settings_and_the_others_finish(project: Path, local_ray: Path) -> None:
    study = write_study(project, methods={"L1": {"prune.method": "l1"}}, ratios=[0.5],
                        retrain={"fast": {"retrain.lr": 0.01}, "wild": {"retrain.lr": 1.0e12}})
    with pytest.raises(PipelineError) as caught:
        run_study(study, project / "out", root=project, executor="ray", gpus_per_task=0)
    message = str(caught.value)
    assert "1 of 2 cells failed" in message and "L1 · ratio 0.5 · wild · seed 0" in message
    assert "TrainingError" in message and "retrain.lr 1e+12" in message and "· fast ·" not in message
    assert len(list((project / "out" / "cache").glob("cell-*.json"))) == 1
    assert [task["cell"] for task in tasks(project / "out") if task["kind"] == "cell"] == [
        "L1 · ratio 0.5 · fast · seed 0"]


def wait_until_gone(marker: str, timeout: float = 300) -> None:
    """Wait until no process has `marker` (NAME=VALUE) in its environment: the Ray processes a killed driver
    started inherit its environment and outlive it briefly (a worker notices its raylet is gone only when its
    task returns)."""
    name, value = marker.split("=")
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for process in psutil.process_iter():
            try:
                if process.environ().get(name) == value:
                    alive.append(process.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        if not alive:
            return
        assert time.monotonic() < deadline, f"processes of the killed driver still run after {timeout:.0f} s: {alive}"
        time.sleep(0.2)


@pytest.mark.slow  # a driver of its own (its own Ray start), killed, then the study rerun
def test_a_killed_driver_loses_only_running_tasks(project: Path, local_ray: Path) -> None:
    study = write_study(project, methods={"L1": {"prune.method": "l1"}})
    output = project / "out"
    cache = output / "cache"
    marker = f"TPP_TEST_KILLED_DRIVER={uuid.uuid4().hex}"
    environment = {**os.environ, "PYTHONPATH": str(REPO), "TPP_TEST_KILLED_DRIVER": marker.split("=")[1]}
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.study", str(study), "--executor", "ray", "--output",
                               str(output), "--gpus-per-task", "0"], cwd=project, env=environment,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not list(cache.glob("cell-*.json")) and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    wait_until_gone(marker)   # its Ray workers finish their running task (writing it to the cache), then exit
    finished = {path: path.stat().st_mtime_ns for path in cache.glob("*-*.*")}
    assert any(path.name.startswith("cell-") for path in finished) and len(list(cache.glob("cell-*.json"))) < 4
    before = len(tasks(output))

    run_study(study, output, root=project, executor="ray", gpus_per_task=0)
    assert {path: path.stat().st_mtime_ns for path in finished} == finished, "a finished piece was recomputed"
    rerun = tasks(output)[before:]
    assert "dense" not in [task["kind"] for task in rerun]
    assert len([task for task in rerun if task["kind"] == "cell"]) == 4 - sum(
        path.name.startswith("cell-") for path in finished)
    assert len((output / "cells.csv").read_text().splitlines()) == 1 + 4
