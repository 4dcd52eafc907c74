"""A study's cells as Ray tasks: the grid's DAG spread over the GPUs (or cores) of one machine or a cluster.

The study is three layers of work: one dense network per seed, one pruned network per (method, ratio, seed), one
retrained cell per schedule. Each piece becomes a Ray task, and a task's result reference is the argument of the
pieces built from it, so Ray starts a prune as soon as its dense network exists and a cell as soon as its pruned
one does. Ray gives a training task one GPU on a GPU machine (it sets `CUDA_VISIBLE_DEVICES`, so the task sees
it as `cuda:0`; the driver never touches CUDA) and a share of the cores on a CPU machine; each task runs torch with
as many threads as CPUs it holds.

Durability is the study cache, not Ray: every task writes its piece into the cache folder (atomically, under the
same keys as the serial executor) before it returns, and the driver submits only what the cache lacks. A killed
driver or a lost worker therefore loses only the tasks that were running; the next run picks up from the cache.
The driver is the only MLflow writer: tasks return their measurements and the driver logs each cell, so runs look
as in a serial study. The cache folder must be visible to every node (a shared filesystem) on a cluster.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import pipeline
from pipeline.errors import ConfigError, PipelineError
from pipeline.progress import console

RAY_MISSING = ("--executor ray needs the 'ray' package, which is not installed in this environment. Install it "
               "with `pip install 'ray>=2.49'` (it is in requirements.lock), or run the study with the default "
               "--executor serial.")
TASK_LOG = "tasks.jsonl"
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20
LOCAL_ONLY_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class TaskShape:
    """What every training task asks Ray for."""

    num_cpus: int
    num_gpus: float

    @property
    def threads(self) -> int:
        return self.num_cpus


@dataclass
class Failure:
    """A cell that did not finish and why."""

    cell: Any
    error: str


def check_ray_installed() -> None:
    """A ConfigError saying how to get Ray, raised before the study takes its lock; Ray itself is imported only
    when it starts, because a private start must configure it first (see `start_ray`)."""
    if importlib.util.find_spec("ray") is None:
        raise ConfigError(RAY_MISSING)


def start_ray(address: Optional[str], num_cpus: Optional[int] = None, num_gpus: Optional[int] = None) -> bool:
    """Join the cluster at `address` (`auto`: the one `ray start` runs on this machine), or start a private Ray
    on this machine that listens on 127.0.0.1 only, with no dashboard (`num_cpus`/`num_gpus` default to what Ray
    detects) and workers at normal priority (Ray's default niceness 15 starves the study's tasks on a machine
    that runs anything else). An already initialised Ray (a test's, a notebook's) is used as it is. Returns
    whether this call started Ray, so that the caller stops what it started and nothing else.

    Ray binds its servers to the node's address, which it takes to be the machine's reachable IP unless it runs
    as a single-machine Ray (its mode for laptops, switched by LOCAL_ONLY_VARIABLE, read when `ray` is imported
    and by every Ray process it starts): a private start sets it before Ray is imported and checks the result."""
    if address is None:
        os.environ[LOCAL_ONLY_VARIABLE] = "0"
    check_ray_installed()
    import ray

    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": {"PYTHONPATH": code_root()}}
    if address is not None:
        try:
            ray.init(address=address, runtime_env=runtime_env, logging_level="WARNING")
        except ConnectionError as error:
            raise PipelineError(f"--address {address}: no Ray cluster answers there ({error}). Start one first "
                                f"(`ray start --head` on the head node, see README: Studies on Ray), or leave out "
                                f"--address to start a private Ray on this machine.") from None
        return True
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
             object_store_memory=LOCAL_OBJECT_STORE_BYTES, runtime_env=runtime_env, logging_level="WARNING",
             _system_config={"worker_niceness": 0})
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:
        ray.shutdown()
        raise PipelineError(f"The private Ray started for this study would listen on {node_ip}, not {LOOPBACK}: "
                            f"'ray' was imported before the study could set {LOCAL_ONLY_VARIABLE}=0. Run the study "
                            f"from the command line, set {LOCAL_ONLY_VARIABLE}=0 before importing ray, or start "
                            f"Ray yourself and pass --address.")
    return True


def code_root() -> str:
    """The folder holding the `pipeline` package, put on the workers' PYTHONPATH so that they run this code."""
    return str(Path(pipeline.__file__).resolve().parents[1])


def task_shape(device: str, resources: Mapping[str, float], cpus_per_task: Optional[int],
               gpus_per_task: Optional[float]) -> TaskShape:
    """One GPU per task where the cluster has GPUs and the settings allow CUDA, else one core; the CPUs of a GPU
    task default to the cluster's cores per GPU. Requests the cluster cannot grant are refused up front: Ray would
    otherwise wait for them forever."""
    cpus, gpus = int(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    if gpus_per_task is None:
        gpus_per_task = 1.0 if gpus >= 1 and device != "cpu" else 0.0
    if gpus_per_task < 0 or gpus_per_task > max(gpus, 0) or (gpus_per_task > 0 and device == "cpu"):
        raise ConfigError(f"--gpus-per-task {gpus_per_task:g} cannot be granted: the Ray cluster has {gpus:g} GPU(s) "
                          f"and the study's device is '{device}'. Leave --gpus-per-task out (one GPU per task "
                          f"where there are GPUs, else none), or pass a value from 0 to {gpus:g}.")
    if cpus_per_task is None:
        cpus_per_task = max(1, int(cpus * gpus_per_task // gpus)) if gpus_per_task > 0 else 1
    if cpus_per_task < 1 or cpus_per_task > cpus:
        raise ConfigError(f"--cpus-per-task {cpus_per_task} cannot be granted: the Ray cluster has {cpus} CPU(s). "
                          f"Pass a count from 1 to {cpus}, or leave it out.")
    return TaskShape(num_cpus=cpus_per_task, num_gpus=gpus_per_task)


@dataclass
class _Submitted:
    kind: str
    cell: Any


class StudyProgress:
    """The driver's one view of the study: cells done, cached and in flight, and every failure as it happens."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = self.cached = self.failed = 0
        self._progress = Progress(TextColumn("[bold]study"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                                  disable=not console.is_terminal, transient=False)
        self._task = self._progress.add_task("", total=total)

    def __enter__(self) -> "StudyProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.stop()

    def update(self, running: Mapping[str, int]) -> None:
        flight = ", ".join(f"{count} {kind}" for kind, count in running.items() if count) or "none"
        self._progress.update(self._task, completed=self.done + self.cached + self.failed, description=(
            f"{self.done} computed · {self.cached} cached · {self.failed} failed · in flight: {flight}"))

    def line(self, text: str) -> None:
        self._progress.console.print(text, markup=False, soft_wrap=True)


def run_on_ray(cells: Sequence[Any], cache: Path, code: str, output: Path, address: Optional[str],
               cpus_per_task: Optional[int], gpus_per_task: Optional[float], build_piece: Callable[..., Dict[str, Any]],
               cached_result: Callable[[Any], Optional[Dict[str, Any]]], piece_cached: Callable[[str, Any], bool],
               piece_key: Callable[[str, Any], str], log_cell: Callable[[Any, Dict[str, Any], bool], None]
               ) -> Tuple[List[Dict[str, Any]], List[Failure]]:
    """Submit what the cache lacks as a DAG of tasks, log every cell as it arrives, and return the cells' results
    and the failures. Cached cells are logged without a task. `build_piece(kind, cell, cache, code, threads,
    workdir, *needs)` is the body of every task; it returns {"result": the cell's measurements or None, "task":
    where and when it ran}."""
    started_here = start_ray(address)
    import ray

    try:
        shape = task_shape(cells[0].config.device, ray.cluster_resources(), cpus_per_task, gpus_per_task)
        remote = ray.remote(num_cpus=shape.num_cpus, num_gpus=shape.num_gpus, max_calls=1 if shape.num_gpus else 0,
                            max_retries=1, retry_exceptions=False)(build_piece)
        console.print(f"[study] Ray: {ray.cluster_resources().get('CPU', 0):g} CPU(s), "
                      f"{ray.cluster_resources().get('GPU', 0):g} GPU(s); each task takes {shape.num_cpus} CPU(s) and "
                      f"{shape.num_gpus:g} GPU(s)", markup=False, soft_wrap=True)
        workdir = str(Path.cwd())   # where relative settings (data.root) resolve, as in a serial study
        results: List[Dict[str, Any]] = []
        failures: List[Failure] = []
        pending: Dict[Any, _Submitted] = {}
        refs: Dict[Tuple[str, str], Any] = {}
        with StudyProgress(len(cells)) as progress, open(output / TASK_LOG, "a") as task_log:
            for cell in cells:
                result = cached_result(cell)
                if result is not None:
                    log_cell(cell, result, True)
                    results.append(result)
                    progress.cached += 1
                    continue
                needs: Tuple[Any, ...] = ()   # a prune waits for its dense network, a cell for both
                for kind in ("dense", "pruned"):
                    key = (kind, piece_key(kind, cell))
                    if key not in refs and not piece_cached(kind, cell):
                        refs[key] = remote.remote(kind, cell, str(cache), code, shape.threads, workdir, *needs)
                        pending[refs[key]] = _Submitted(kind, cell)
                    needs += (refs[key],) if key in refs else ()
                ref = remote.remote("cell", cell, str(cache), code, shape.threads, workdir, *needs)
                pending[ref] = _Submitted("cell", cell)
            progress.update(_in_flight(pending))
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    submitted = pending.pop(ref)
                    try:
                        answer = ray.get(ref)
                    except Exception as error:  # noqa: BLE001 - any task error is reported with its cell
                        if submitted.kind == "cell":
                            failures.append(Failure(submitted.cell, _short(error)))
                            progress.failed += 1
                            progress.line(f"[study] FAILED {submitted.cell.label}: {_short(error)}\n"
                                          f"        settings: {cell_settings(submitted.cell)}")
                        continue
                    task_log.write(json.dumps(answer["task"]) + "\n")
                    task_log.flush()
                    if submitted.kind == "cell":
                        log_cell(submitted.cell, answer["result"], False)
                        results.append(answer["result"])
                        progress.done += 1
                        progress.line(f"[study] done {submitted.cell.label}: after pruning "
                                      f"{answer['result']['pruned_acc']:.2f}%, best retrained "
                                      f"{answer['result']['best_acc']:.2f}%")
                progress.update(_in_flight(pending))
        return results, failures
    finally:
        if started_here:
            ray.shutdown()


def _in_flight(pending: Mapping[Any, _Submitted]) -> Dict[str, int]:
    counts = {"dense": 0, "pruned": 0, "cell": 0}
    for submitted in pending.values():
        counts[submitted.kind] += 1
    return counts


def _short(error: BaseException) -> str:
    """The task's own exception in one line (Ray wraps it with the remote traceback)."""
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {' '.join(str(cause).split())}"[:600]


def cell_settings(cell: Any) -> str:
    """The settings that tell a cell from its neighbours, for a failure report."""
    config = cell.config
    return (f"method {cell.method} (prune.method {config.prune.method}), prune.ratio {cell.ratio:g}, schedule "
            f"{cell.schedule} (retrain.lr {config.retrain.lr:g}, retrain.epochs {config.retrain.epochs}), seed "
            f"{cell.seed}")
