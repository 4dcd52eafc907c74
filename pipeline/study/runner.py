"""Studies: the paper's comparisons in one command, methods × pruning ratios × retraining schedules × seeds.

A study file (`studies/*.yaml`) names a base settings file, overrides shared by every cell and the grid's axes.
The runner trains one dense network per seed, prunes it once per method and ratio, retrains each pruned network
once per schedule, and measures every cell like the evaluate stage (accuracy right after pruning, best and final
retrained accuracy, mean JSV dense / after pruning / after every retraining epoch, parameters, MACs). It calls the
same phase functions as the DVC stages (`pipeline.experiment`), in one process, so a cell equals the pipeline run
with its settings without a hundred process start-ups.

Every finished piece is cached in the output folder under a hash of exactly the settings and library code it
depends on (the dense network: seed, data, model, pretrain; the pruned one: those and prune; a cell: those and
retrain, trainability), so a killed study resumes where it stopped and a widened grid computes only what is new.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import fcntl
import hashlib
import json
import os
import socket
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import yaml
from torch import nn

from pipeline import experiment
from pipeline.checkpoint import Architecture, load_checkpoint, save_checkpoint
from pipeline.config import Config, config_to_dict, project_root, read_settings
from pipeline.fingerprint import code_fingerprint
from pipeline.settings import settings_from_mapping
from pipeline.data import build_loaders
from pipeline.errors import CheckpointError, ConfigError, PipelineError
from pipeline.files import atomic_write_text
from pipeline.measure.cost import count_macs, count_parameters
from pipeline.models import model_spec
from pipeline.progress import console
from pipeline.runtime import Runtime, configure_numerics, resolve_device, resolve_runtime
from pipeline.study.ray_executor import cell_settings, check_ray_installed, run_on_ray
from pipeline.study.outputs import write_study_outputs
from pipeline.threads import use_thread_share
from pipeline.tracking import RunGroup, StageTracker, track_stage
from pipeline.training.loop import EpochRecord, evaluate

DENSE_SECTIONS = ("seed", "device", "amp", "trainer", "data", "model", "pretrain")
PRUNED_SECTIONS = DENSE_SECTIONS + ("prune",)
CELL_SECTIONS = PRUNED_SECTIONS + ("retrain", "trainability")
RESULTS_FOLDER = "results"
LOCK_FILE = ".study.lock"
EXECUTORS = ("serial", "ray")
PIECE_SECTIONS = {"dense": DENSE_SECTIONS, "pruned": PRUNED_SECTIONS}


@dataclass
class StudySpec:
    """A study file: which settings every cell starts from, and the axes of the grid."""

    name: str
    description: str = ""
    base: str = "params.yaml"
    settings: Dict[str, Any] = field(default_factory=dict)
    methods: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    ratios: List[float] = field(default_factory=list)
    retrain: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])


@dataclass(frozen=True)
class Cell:
    """One point of the grid and its complete, validated settings."""

    method: str
    ratio: float
    schedule: str
    seed: int
    config: Config

    @property
    def label(self) -> str:
        return f"{self.method} · ratio {self.ratio:g} · {self.schedule} · seed {self.seed}"


def load_study(path: Path) -> StudySpec:
    """Read and check a study file; every mistake is a ConfigError naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"The study file {path} does not exist. The shipped studies are in studies/ "
                          f"(e.g. studies/table1.yaml).")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML ({' '.join(str(error).split())}). Fix its syntax.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping with the keys name, base, settings, methods, ratios, retrain "
                          f"and seeds (see studies/table1.yaml).")
    known = [f.name for f in dataclasses.fields(StudySpec)]
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{path}: unknown key '{key}'.{hint} A study file has the keys {', '.join(known)}.")
    spec = StudySpec(**{"name": path.stem, **raw})
    _check_spec(spec, path)
    return spec


def _check_spec(spec: StudySpec, path: Path) -> None:
    """Types and non-empty axes; the values themselves are checked per cell against the settings schema."""
    def require(condition: bool, key: str, problem: str) -> None:
        if not condition:
            raise ConfigError(f"{path}: '{key}' {problem}. Fix it in the study file.")

    require(isinstance(spec.name, str) and spec.name.replace("-", "").replace("_", "").isalnum(), "name",
            f"{spec.name!r} must be a plain name (letters, digits, '-' and '_'): it names the output folder")
    require(isinstance(spec.base, str), "base", "must be the path of a settings file such as params.yaml")
    require(isinstance(spec.settings, dict), "settings", "must map dotted keys to values, e.g. {model.name: resnet20}")
    for axis in ("methods", "retrain"):
        groups = getattr(spec, axis)
        require(isinstance(groups, dict) and len(groups) > 0 and all(isinstance(v, dict) for v in groups.values()),
                axis, "must map row names to overrides, e.g. {TPP: {prune.method: tpp}}, with at least one entry")
    require(isinstance(spec.ratios, list) and len(spec.ratios) > 0
            and all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in spec.ratios), "ratios",
            "must be a non-empty list of pruning ratios such as [0.5, 0.7, 0.9]")
    require(isinstance(spec.seeds, list) and len(spec.seeds) > 0
            and all(isinstance(s, int) and not isinstance(s, bool) for s in spec.seeds), "seeds",
            "must be a non-empty list of integer seeds such as [0, 1, 2]")
    for axis in ("ratios", "seeds"):
        values = getattr(spec, axis)
        require(len(set(values)) == len(values), axis, f"{values} lists a value twice")


def plan(spec: StudySpec, study_path: Path, root: Path) -> List[Cell]:
    """Every cell of the grid with its settings checked, so a bad value stops the study before any training.

    Seeds vary slowest and schedules fastest, so consecutive cells share their dense and pruned networks.
    """
    base_path = root / spec.base
    if not base_path.is_file():
        raise ConfigError(f"{study_path}: 'base' names {spec.base}, which does not exist in {root}. It is the "
                          f"settings file every cell starts from, relative to the repository root (params.yaml "
                          f"or a recipe).")
    base = read_settings(base_path)
    cells = []
    for seed in spec.seeds:
        for method, method_overrides in spec.methods.items():
            for ratio in spec.ratios:
                for schedule, schedule_overrides in spec.retrain.items():
                    raw = copy.deepcopy(base)
                    for overrides in (spec.settings, method_overrides, {"prune.ratio": ratio}, schedule_overrides,
                                      {"seed": seed}):
                        _apply(raw, overrides, study_path, base_path)
                    cells.append(_cell(method, ratio, schedule, seed, raw, study_path))
    return cells


def _apply(raw: Dict[str, Any], overrides: Mapping[str, Any], study_path: Path, base_path: Path) -> None:
    """Set dotted keys (`retrain.lr: 0.001`) in the nested settings; a key the base file lacks is refused."""
    for dotted, value in overrides.items():
        *sections, leaf = str(dotted).split(".")
        node = raw
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise ConfigError(f"{study_path}: the override '{dotted}' names no setting of {base_path.name}. "
                              f"Overrides use the dotted keys of params.yaml, such as 'prune.method' or "
                              f"'retrain.lr'.")
        node[leaf] = copy.deepcopy(value)


def _cell(method: str, ratio: float, schedule: str, seed: int, raw: Dict[str, Any], study_path: Path) -> Cell:
    try:
        config = settings_from_mapping(raw)
    except ConfigError as error:
        raise ConfigError(f"{study_path}, cell '{method}' at ratio {ratio:g}, '{schedule}', seed {seed}: "
                          f"{error}") from None
    return Cell(method, float(ratio), schedule, seed, config)


def settings_key(config: Config, sections: Sequence[str], code: str) -> str:
    """Short hash of the named sections of the settings and the code version."""
    settings = config_to_dict(config)
    payload = json.dumps({"code": code, **{name: settings[name] for name in sections}}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class _Built:
    """A network made by a phase, what it measured, and (pruned networks) the filters it lost."""

    model: nn.Module
    architecture: Architecture
    metrics: Dict[str, Any]
    pruned: Optional[Dict[str, torch.Tensor]] = None


class StudyRunner:
    """Computes cells through cached dense and pruned networks, keeping the last of each in memory."""

    def __init__(self, cache: Path, runtime: Runtime, code: str) -> None:
        self.cache = cache
        self.runtime = runtime
        self.code = code
        self._memory: Dict[str, Tuple[str, _Built]] = {}

    def cell(self, cell: Cell) -> Tuple[Dict[str, Any], bool]:
        """The cell's measurements and whether they came from the cache."""
        path = self.cache / f"cell-{settings_key(cell.config, CELL_SECTIONS, self.code)}.json"
        labels = {"method": cell.method, "ratio": cell.ratio, "schedule": cell.schedule, "seed": cell.seed}
        cached = _read_cell(path) if path.is_file() else None
        if cached is not None:
            return {**cached, **labels}, True
        pruned = self.pruned(cell.config)
        config = cell.config
        train, test, _ = build_loaders(config.data, batch_size=config.retrain.batch_size, seed=config.seed,
                                       device=self.runtime.device)
        model = copy.deepcopy(pruned.model)
        history = experiment.retrain(config, model, train, test, self.runtime)
        result = {**labels, **self.dense(config).metrics, **pruned.metrics,
                  "best_acc": max(record.test_acc for record in history), "final_acc": history[-1].test_acc,
                  "jsv_final": history[-1].extra.get("mean_jsv"), "history": [_epoch_row(r) for r in history]}
        atomic_write_text(path, json.dumps(result, indent=1, sort_keys=True) + "\n")
        return result, False

    def dense(self, config: Config) -> _Built:
        """The dense network of these settings: from memory, the cache, or trained now."""
        return self._reuse("dense", config, DENSE_SECTIONS, self._train_dense)

    def pruned(self, config: Config) -> _Built:
        """The pruned network of these settings: from memory, the cache, or pruned now."""
        return self._reuse("pruned", config, PRUNED_SECTIONS, self._prune)

    def _reuse(self, kind: str, config: Config, sections: Sequence[str],
               build: Callable[[Config], _Built]) -> _Built:
        """From memory, else from the cache folder, else built now and saved as a self-describing checkpoint."""
        key = settings_key(config, sections, self.code)
        if kind in self._memory and self._memory[kind][0] == key:
            return self._memory[kind][1]
        path = self.cache / f"{kind}-{key}.pt"
        built = _load_cached(path, self.runtime.device) if path.is_file() else None
        if built is None:
            built = build(config)
            save_checkpoint(path, built.model, built.architecture, pruned=built.pruned,
                            config=config_to_dict(config), metrics=built.metrics)
        self._memory[kind] = (key, built)
        return built

    def _train_dense(self, config: Config) -> _Built:
        train, test, info = build_loaders(config.data, batch_size=config.pretrain.batch_size, seed=config.seed,
                                          device=self.runtime.device)
        spec = model_spec(config.model.name, config.model.factory)
        architecture = Architecture(spec, info.num_classes, info.input_shape, config.model.options)
        model, history = experiment.pretrain(config, architecture, train, test, self.runtime)
        probe = experiment.trainability_inputs(config, test, self.runtime.device)
        metrics = {"dense_acc": history[-1].test_acc, "jsv_dense": experiment.trainability(model, probe),
                   "params_dense": count_parameters(model),
                   "macs_dense": count_macs(model, architecture.example_inputs(self.runtime.device))}
        return _Built(model, architecture, metrics)

    def _prune(self, config: Config) -> _Built:
        dense = self.dense(config)
        train, test, _ = build_loaders(config.data, batch_size=config.prune.batch_size, seed=config.seed,
                                       device=self.runtime.device)
        model = copy.deepcopy(dense.model)
        example = dense.architecture.example_inputs(self.runtime.device)
        selection = experiment.select(config, model, example)
        outcome = experiment.prune(config, model, selection, example, train, test, self.runtime)
        probe = experiment.trainability_inputs(config, test, self.runtime.device)
        metrics = {"pruned_acc": evaluate(outcome.model, test, self.runtime.device, self.runtime.amp)[1],
                   "jsv_pruned": experiment.trainability(outcome.model, probe),
                   "params_pruned": count_parameters(outcome.model),
                   "macs_pruned": count_macs(outcome.model, example)}
        return _Built(outcome.model, dense.architecture, metrics, dict(outcome.pruned))


def build_piece(kind: str, cell: Cell, cache: str, code: str, threads: int, workdir: str,
                *needs: Any) -> Dict[str, Any]:
    """The body of every task: build one piece (into the cache) on the device Ray granted, with `threads` CPU
    threads, in the driver's working directory (relative settings such as data.root mean there what they mean
    to the serial executor), and say where and when it ran. `needs` are the results of the pieces it is built
    from: Ray passes them only once they exist, which is what orders the DAG."""
    import ray

    started = time.time()
    os.chdir(workdir)
    torch.set_num_threads(threads)
    config = cell.config
    device = resolve_device(config.device)
    configure_numerics(config.trainer, device)
    runner = StudyRunner(Path(cache), resolve_runtime(config.trainer, device, config.amp), code)
    result = None
    if kind == "dense":
        runner.dense(config)
    elif kind == "pruned":
        runner.pruned(config)
    else:
        result, _ = runner.cell(cell)
    return {"result": result, "task": {
        "kind": kind, "cell": cell.label, "pid": os.getpid(), "host": socket.gethostname(),
        "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()], "cuda_visible_devices": os.environ.get(
            "CUDA_VISIBLE_DEVICES"), "threads": torch.get_num_threads(), "device": str(device), "start": started,
        "end": time.time()}}


def _load_cached(path: Path, device: torch.device) -> Optional[_Built]:
    """A cached network, or None (with a warning) when the file cannot be used: it is then simply rebuilt."""
    try:
        checkpoint = load_checkpoint(path, device=device)
    except CheckpointError as error:
        warnings.warn(f"The study cache file {path} is unusable and is computed again: {error}")
        return None
    return _Built(checkpoint.model, checkpoint.architecture, checkpoint.metrics, checkpoint.pruned)


def _read_cell(path: Path) -> Optional[Dict[str, Any]]:
    """A cached cell's measurements, or None (with a warning) when the file is damaged: it is recomputed."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        warnings.warn(f"The study cache file {path} is unusable and is computed again: {error}")
        return None


def _epoch_row(record: EpochRecord) -> Dict[str, float]:
    """What the study keeps of a retraining epoch."""
    return {"epoch": record.epoch, "test_acc": record.test_acc, "train_loss": record.train_loss,
            **record.extra}


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
        stored = _read_cell(path) if path.is_file() else None
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
