"""Studies: the paper's comparisons in one command, methods × pruning ratios × retraining schedules × seeds.

A study file (`studies/*.yaml`) names a base settings file, overrides shared by every cell and the grid's axes.
The runner (`grid` reads the file into cells; `pieces` builds and caches each piece) trains one dense network per
seed, prunes it once per method and ratio, retrains each pruned network once per schedule, and measures every cell like the evaluate stage (accuracy right after pruning, best and final
retrained accuracy, mean JSV dense / after pruning / after every retraining epoch, parameters, MACs). It calls the
same phase functions as the DVC stages (`pipeline.experiment`), in one process, so a cell equals the pipeline run
with its settings without a hundred process start-ups.

Every finished piece is cached in the output folder under a hash of exactly the settings and library code it
depends on (the dense network: seed, data, model, pretrain; the pruned one: those and prune; a cell: those and
retrain, trainability), so a killed study resumes where it stopped and a widened grid computes only what is new.
"""

from __future__ import annotations

import argparse
import fcntl
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

from pipeline.config import Config, config_to_dict, project_root
from pipeline.fingerprint import code_fingerprint
from pipeline.errors import ConfigError, PipelineError
from pipeline.progress import console
from pipeline.runtime import Runtime, configure_numerics, resolve_device, resolve_runtime
from pipeline.study.grid import Cell, StudySpec, load_study, plan
from pipeline.study.pieces import CELL_SECTIONS, PIECE_SECTIONS, StudyRunner, build_piece, read_cell, settings_key
from pipeline.study.ray_executor import cell_settings, check_ray_installed, run_on_ray
from pipeline.study.outputs import write_study_outputs
from pipeline.threads import use_thread_share
from pipeline.tracking import RunGroup, StageTracker, track_stage

RESULTS_FOLDER = "results"
LOCK_FILE = ".study.lock"
EXECUTORS = ("serial", "ray")


def run_study(study_path: Path, output: Optional[Path] = None, root: Optional[Path] = None,
              executor: str = "serial", address: Optional[str] = None, cpus_per_task: Optional[int] = None,
              gpus_per_task: Optional[float] = None) -> Path:
    """Run (or resume) every cell of a study, then write its tables and figures; returns the output folder.

    `executor` is `serial` (every cell in this process, one after another: the reference) or `ray` (the grid's
    DAG as Ray tasks, see `pipeline.study.ray_executor`); both fill the same cache and give the same results.
    """
    root = Path(root) if root is not None else project_root()
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor '{executor}' is not one of {', '.join(EXECUTORS)}. Use serial (the default, "
                          f"every cell in this process) or ray (cells as Ray tasks, on this machine or a cluster).")
    if executor == "serial" and (address, cpus_per_task, gpus_per_task) != (None, None, None):
        raise ConfigError("--address, --cpus-per-task and --gpus-per-task only apply to --executor ray. Add "
                          "--executor ray, or leave them out.")
    spec = load_study(study_path)
    cells = plan(spec, study_path, root)
    setup = _study_setup(cells, study_path)
    runtime = _study_runtime(setup) if executor == "serial" else None
    if executor == "ray":
        check_ray_installed()
    output = Path(output) if output is not None else root / RESULTS_FOLDER / spec.name
    with _exclusive(output, study_path):
        code = code_fingerprint()
        group = RunGroup(f"study:{spec.name}:{uuid.uuid4().hex}", f"study {spec.name}", f"tpp-study-{spec.name}")
        where = f"on {runtime.device}" if runtime is not None else "as Ray tasks"
        console.print(f"[study] {spec.name}: {len(spec.methods)} methods × {len(spec.ratios)} ratios × "
                      f"{len(spec.retrain)} schedules × {len(spec.seeds)} seeds = {len(cells)} cells {where}; "
                      f"results in {output}", markup=False, soft_wrap=True)
        started = time.perf_counter()

        if runtime is not None:
            results = _run_serially(cells, StudyRunner(output / "cache", runtime, code), group, started)
        else:
            def log_cell(cell: Cell, result: Mapping[str, Any], cached: bool) -> None:
                with track_stage(cell.label, params=_cell_params(cell), group=group) as tracker:
                    _log_cell(tracker, result, cached)

            results = _run_on_ray(cells, output, code, address, cpus_per_task, gpus_per_task, log_cell)
        write_study_outputs(spec.name, spec.description, _report_order(spec, results), output)
        with track_stage("report", group=group, close_pipeline=True) as tracker:
            tracker.log_artifact(output / "report.md")
            for figure in sorted(output.glob("*.png")) + sorted(output.glob("*.csv")):
                tracker.log_artifact(figure)
        console.print(f"[study] {spec.name} finished in {time.perf_counter() - started:.0f}s: {output / 'report.md'}",
                      markup=False, soft_wrap=True)
    return output


def _run_serially(cells: Sequence[Cell], runner: StudyRunner, group: RunGroup,
                  started: float) -> List[Dict[str, Any]]:
    """Every cell in this process, in the study's order, each inside its MLflow run; the first failure stops the
    study."""
    results = []
    for index, cell in enumerate(cells, 1):
        console.print(f"[study] cell {index}/{len(cells)}: {cell.label}", markup=False, soft_wrap=True)
        with track_stage(cell.label, params=_cell_params(cell), group=group) as tracker:
            result, cached = runner.cell(cell)
            _log_cell(tracker, result, cached)
        results.append(result)
        console.print(f"[study] cell {index}/{len(cells)} {'reused' if cached else 'done'}: {cell.label}: "
                      f"after pruning {result['pruned_acc']:.2f}%, best retrained {result['best_acc']:.2f}% "
                      f"({time.perf_counter() - started:.0f}s elapsed)", markup=False, soft_wrap=True)
    return results


def _run_on_ray(cells: Sequence[Cell], output: Path, code: str, address: Optional[str],
                cpus_per_task: Optional[int], gpus_per_task: Optional[float],
                log_cell: Callable[[Cell, Mapping[str, Any], bool], None]) -> List[Dict[str, Any]]:
    """The grid as Ray tasks; failed cells are listed with their settings after every other cell has finished."""
    cache = output / "cache"
    cache.mkdir(parents=True, exist_ok=True)

    def cached_result(cell: Cell) -> Optional[Dict[str, Any]]:
        path = cache / f"cell-{settings_key(cell.config, CELL_SECTIONS, code)}.json"
        stored = read_cell(path) if path.is_file() else None
        labels = {"method": cell.method, "ratio": cell.ratio, "schedule": cell.schedule, "seed": cell.seed}
        return None if stored is None else {**stored, **labels}

    def piece_key(kind: str, cell: Cell) -> str:
        return settings_key(cell.config, PIECE_SECTIONS[kind], code)

    def piece_cached(kind: str, cell: Cell) -> bool:
        return (cache / f"{kind}-{piece_key(kind, cell)}.pt").is_file()

    results, failures = run_on_ray(cells, cache, code, output, address, cpus_per_task, gpus_per_task,
                                   build_piece, cached_result, piece_cached, piece_key, log_cell)
    if failures:
        listing = "; ".join(f"{failure.cell.label} [{cell_settings(failure.cell)}]: {failure.error}"
                            for failure in failures)
        raise PipelineError(f"{len(failures)} of {len(cells)} cells failed ({listing}). The other cells are in the "
                            f"cache ({cache}): fix the cause and run the study again to compute only the failed "
                            f"ones.")
    return results


@contextmanager
def _exclusive(output: Path, study_path: Path) -> Iterator[None]:
    """Hold the study's output folder for this run only: two runs of one study would compute the same cells twice
    and write the same cache and report files. The lock is the operating system's (flock), so it goes away with
    the process, however that ends."""
    output.mkdir(parents=True, exist_ok=True)
    with open(output / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError(f"{study_path}: this study is already running: another process holds "
                                f"{output / LOCK_FILE}. Wait for it to finish (an interrupted study resumes from "
                                f"its cache when run again), or pass --output with another folder to run a "
                                f"separate copy.") from None
        yield


def _study_setup(cells: Sequence[Cell], study_path: Path) -> Config:
    """The one device, precision and trainer setup all cells run on (cells cannot differ in it), checked without
    touching the device: under Ray, each task resolves it where it runs."""
    setups = {(cell.config.device, cell.config.amp, repr(cell.config.trainer)) for cell in cells}
    if len(setups) > 1:
        raise ConfigError(f"{study_path}: the cells ask for different devices, precisions or trainer settings "
                          f"{sorted(setups)}; a study runs on one. Set 'device', 'amp' and 'trainer' in 'settings', "
                          f"not per method or schedule.")
    config = cells[0].config
    if config.trainer.devices * config.trainer.nodes > 1:
        raise ConfigError(f"{study_path}: trainer.devices is {config.trainer.devices} and trainer.nodes "
                          f"{config.trainer.nodes}, but a study runs each cell in one process. Set both to 1 in the "
                          f"study's settings (stages run under torchrun; studies do not).")
    return config


def _study_runtime(config: Config) -> Runtime:
    """The serial executor's runtime, resolved once in this process, which takes its share of the cores."""
    device = resolve_device(config.device)
    configure_numerics(config.trainer, device)
    use_thread_share("study")
    return resolve_runtime(config.trainer, device, config.amp)


def _report_order(spec: StudySpec, results: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Results in the study file's order (schedule, method, ratio, seed) for tables and legends."""
    rank = {"schedule": list(spec.retrain), "method": list(spec.methods), "ratio": [float(r) for r in spec.ratios],
            "seed": list(spec.seeds)}
    return sorted(results, key=lambda r: tuple(rank[key].index(r[key]) for key in rank))


def _cell_params(cell: Cell) -> Dict[str, Any]:
    return {"study": {"method": cell.method, "ratio": cell.ratio, "schedule": cell.schedule, "seed": cell.seed},
            **config_to_dict(cell.config)}


def _log_cell(tracker: StageTracker, result: Mapping[str, Any], cached: bool) -> None:
    """Per-epoch curves (step = epoch) and the cell's final figures."""
    for row in result["history"]:
        tracker.log_metrics({key: value for key, value in row.items() if key != "epoch"}, step=row["epoch"])
    tracker.log_metrics({key: value for key, value in result.items()
                         if isinstance(value, (int, float)) and not isinstance(value, bool)
                         and key not in ("ratio", "seed")})
    tracker.set_tags({"tpp.study.cached": str(cached).lower()})


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command line: `python -m pipeline.study studies/table1.yaml [--output DIR] [--executor serial|ray]`."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.study", description=(
        "Run a study (methods × pruning ratios × retraining schedules × seeds) and write its report. Finished "
        "pieces are cached in the output folder, so an interrupted study resumes where it stopped."))
    parser.add_argument("study", type=Path, help="the study file, e.g. studies/table1.yaml")
    parser.add_argument("--output", type=Path, default=None, help="output folder (default: results/<name>)")
    parser.add_argument("--executor", default="serial", help=(
        "serial (default: every cell in this process, one after another) or ray (the grid as Ray tasks: one GPU "
        "per task on a GPU machine, one core per task on a CPU machine)"))
    parser.add_argument("--address", default=None, help=(
        "ray only: the cluster to join, e.g. auto (the one `ray start` runs on this machine) or HEAD:6379; "
        "default: start a private Ray on this machine, bound to 127.0.0.1"))
    parser.add_argument("--cpus-per-task", type=int, default=None, help=(
        "ray only: CPUs (and torch threads) per task; default 1, or the cluster's cores per GPU for GPU tasks"))
    parser.add_argument("--gpus-per-task", type=float, default=None, help=(
        "ray only: GPUs per task (0.5 packs two small cells on a GPU); default 1 where the cluster has GPUs"))
    arguments = parser.parse_args(argv)
    try:
        run_study(arguments.study, arguments.output, executor=arguments.executor, address=arguments.address,
                  cpus_per_task=arguments.cpus_per_task, gpus_per_task=arguments.gpus_per_task)
    except PipelineError as error:
        console.print(f"[bold red]error:[/] {error}", soft_wrap=True)
        raise SystemExit(2) from None
