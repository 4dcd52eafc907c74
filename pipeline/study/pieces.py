"""The cached pieces of a study: one dense network per seed, one pruned network per (method, ratio, seed), one
measured cell per schedule. Each is stored under a hash of exactly the settings and library code it depends on
(`settings_key`), so a killed study resumes where it stopped and a widened grid computes only what is new; a Ray
task builds one piece through `build_piece`."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from pipeline import experiment
from pipeline.checkpoint import Architecture, load_checkpoint, save_checkpoint
from pipeline.config import Config, config_to_dict
from pipeline.data import build_loaders
from pipeline.errors import CheckpointError
from pipeline.files import atomic_write_text
from pipeline.measure.cost import count_macs, count_parameters
from pipeline.models import model_spec
from pipeline.runtime import Runtime, configure_numerics, resolve_device, resolve_runtime
from pipeline.study.grid import Cell
from pipeline.training.loop import EpochRecord, evaluate

DENSE_SECTIONS = ("seed", "device", "amp", "trainer", "data", "model", "pretrain")
PRUNED_SECTIONS = DENSE_SECTIONS + ("prune",)
CELL_SECTIONS = PRUNED_SECTIONS + ("retrain", "trainability")
PIECE_SECTIONS = {"dense": DENSE_SECTIONS, "pruned": PRUNED_SECTIONS}


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
        cached = read_cell(path) if path.is_file() else None
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


def read_cell(path: Path) -> Optional[Dict[str, Any]]:
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
