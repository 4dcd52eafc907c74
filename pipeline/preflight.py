"""The pipeline's first stage: every setting checked before any stage that reads it starts, and each stage's
resolved settings written to its own file.

DVC removes a stage's outputs just before running it, so a bad value found by the stage itself would already
have cost the user its previous outputs. The validate stage depends on all of params.yaml and runs first; the
other stages depend on `settings/<stage>.json` instead of params keys, and read nothing else
(`pipeline.settings_files`). A bad value therefore stops DVC before any output is touched, and since each file holds
exactly the settings its stage reads, a stage reruns exactly when those settings change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import torch
import yaml

from pipeline.checkpoint import Architecture, dense_model, load_checkpoint
from pipeline.config import Config
from pipeline.data import build_loaders
from pipeline.errors import CheckpointError, ConfigError
from pipeline.files import atomic_write_text
from pipeline.models import create_model, model_spec
from pipeline.models.sources import factory_file, has_published_weights
from pipeline.plan import check_prunable
from pipeline.pruning.regularizer import LEARNABLE_TYPES, check_zero_out_schedule
from pipeline.runtime import resolve_device, resolve_runtime
from pipeline.settings_files import RUN_SETTINGS_FILE, SETTINGS_DIR, settings_texts
from pipeline.stage import DENSE_CHECKPOINT, FINAL_CHECKPOINT, PRUNED_CHECKPOINT
from pipeline.training import distributed

PIPELINE_FILE = Path("dvc.yaml")
# Batch sizes that DDP splits over `trainer.devices` × `trainer.nodes` processes.
SPLIT_BATCHES = ("pretrain.batch_size", "prune.batch_size", "retrain.batch_size")
# Any class count builds the network for the device checks; the structural checks use the data's own.
PROBE_CLASSES = 2


def check_runnable(config: Config) -> None:
    """Cross-checks that need neither data nor any GPU work: the device exists here, the precision, step mode and
    process count suit it, every batch splits over the processes, and the model accepts its options."""
    device = resolve_device(config.device)
    distributed.check_devices(config.trainer.devices, device)
    resolve_runtime(config.trainer, device, config.amp)
    processes = config.trainer.devices * config.trainer.nodes
    if processes > 1:
        for key in SPLIT_BATCHES:
            section, name = key.split(".")
            distributed.local_batch_size(getattr(getattr(config, section), name), processes, key)
    model = create_model(model_spec(config.model.name, config.model.factory), PROBE_CLASSES, **config.model.options)
    check_zero_out_schedule(config.prune.reg, sum(isinstance(module, LEARNABLE_TYPES) for module in model.modules()))


def check_starting_weights(config: Config, root: Path) -> None:
    """A `model.checkpoint` file must exist and lie inside something the pretrain stage depends on (data/): a file
    DVC does not see could be replaced without pretraining rerunning, and every later stage would silently keep a
    network made from the old weights."""
    if not config.model.checkpoint:
        return
    path = (root / config.model.checkpoint).resolve()
    if not path.is_file():
        raise CheckpointError(f"model.checkpoint is '{config.model.checkpoint}', which does not exist. Give the "
                              f"path (relative to the repository root) of a dense checkpoint of this pipeline or a "
                              f"plain state_dict .pth, for example under data/.")
    watched = _pretrain_dependencies(root)
    if watched and not any(path.is_relative_to((root / dependency).resolve()) for dependency in watched):
        raise CheckpointError(f"model.checkpoint is '{config.model.checkpoint}', outside everything the pretrain "
                              f"stage depends on, so DVC would not rerun pretraining when that file changes and "
                              f"every later stage would keep a network made from the old weights. Copy it under "
                              f"data/ (for example data/weights/{path.name}), run `dvc add data`, and set "
                              f"model.checkpoint: data/weights/{path.name}; a DVC remote then shares it too.")


def check_before_training(config: Config, root: Path) -> None:
    """Every check that needs no training, run by validate before DVC removes any output: the data can be read and
    fits the settings, the starting weights exist, are readable and fit the model, the layer patterns select
    something the dependency graph can remove (a trial removal on a random-weight copy, checked against the
    masked network), and the checkpoints already in models/ are readable. A dataset still to be downloaded
    (`data.download: true`) is left to the pretrain stage, which downloads it."""
    spec = model_spec(config.model.name, config.model.factory)
    if config.model.pretrained and not has_published_weights(spec):
        raise ConfigError(f"params.yaml: 'model.pretrained' is true but '{spec}' has no published weights (the "
                          f"CIFAR models of this pipeline and your own factories have none; torchvision and timm "
                          f"models with a pretrained tag do). Set model.pretrained: false, or give your own "
                          f"weights with model.checkpoint: <path>.")
    check_outputs(config, root)
    if config.data.download:
        return
    info = build_loaders(config.data, batch_size=1, seed=config.seed, device=torch.device("cpu"))[2]
    architecture = Architecture(spec, info.num_classes, info.input_shape, config.model.options)
    model = dense_model(config.model, architecture) if config.model.checkpoint else architecture.build()
    check_prunable(model, architecture.example_inputs(), config.layer_ratios(), config.prune.skip,
                   config.prune.round_to)


def check_outputs(config: Config, root: Path) -> None:
    """The checkpoints in models/ must be readable checkpoints of this pipeline, and models/dense.pt must be of
    the configured architecture when the pretrain stage will not remake it (its settings did not change)."""
    for relative in (DENSE_CHECKPOINT, PRUNED_CHECKPOINT, FINAL_CHECKPOINT):
        path = root / relative
        if not path.is_file():
            continue
        try:
            checkpoint = load_checkpoint(path)
        except CheckpointError as error:
            raise CheckpointError(f"{error} Before anything runs: restore it with `dvc checkout {relative}`, or "
                                  f"delete it so that `dvc repro` makes it again.") from None
        if relative == DENSE_CHECKPOINT and _pretrain_settings_unchanged(config, root):
            recorded = checkpoint.architecture
            spec = model_spec(config.model.name, config.model.factory)
            if recorded.name != spec or recorded.options != config.model.options:
                raise CheckpointError(f"{relative} holds a '{recorded.name}' with options {recorded.options}, but "
                                      f"params.yaml builds '{spec}' with {config.model.options}, and the pretrain "
                                      f"settings did not change, so DVC would prune and retrain the wrong network. "
                                      f"Restore it with `dvc checkout {relative}`, or delete it so that pretraining "
                                      f"runs again.")


def _pretrain_settings_unchanged(config: Config, root: Path) -> bool:
    path = root / SETTINGS_DIR / "pretrain.json"
    return path.is_file() and path.read_text() == resolved_settings(config)["pretrain"]


def check_factory_watched(config: Config, root: Path) -> None:
    """A `model.factory` defined inside the repository must lie in something the pretrain stage depends on (nets/):
    otherwise editing the model's code would not rerun pretraining and every output would silently describe the old
    network. Code installed as a package (outside the repository) is recorded by its file hash in checkpoints."""
    if not config.model.factory:
        return
    path = factory_file(config.model.factory)
    watched = _pretrain_dependencies(root)
    if not watched or not path.is_relative_to(root.resolve()):
        return
    if not any(path.is_relative_to((root / dependency).resolve()) for dependency in watched):
        raise ConfigError(f"model.factory '{config.model.factory}' is defined in {path.relative_to(root.resolve())}, "
                          f"which no stage depends on: DVC would not rerun pretraining when you edit it. Move the "
                          f"code into nets/ (e.g. nets/{path.name}) and set model.factory: "
                          f"nets.{path.stem}.{config.model.factory.rpartition('.')[2]}.")


def _pretrain_dependencies(root: Path) -> List[str]:
    """The pretrain stage's dependencies as dvc.yaml lists them (none outside a DVC project)."""
    pipeline_file = root / PIPELINE_FILE
    if not pipeline_file.is_file():
        return []
    stages = yaml.safe_load(pipeline_file.read_text()).get("stages", {})
    return [str(dependency) for dependency in stages.get("pretrain", {}).get("deps", [])]


def resolved_settings(config: Config) -> Dict[str, str]:
    """Each stage's settings file as text (`settings_texts` without the run-only file)."""
    texts = settings_texts(config)
    del texts[RUN_SETTINGS_FILE]
    return texts


def write_stage_settings(config: Config, folder: Path = SETTINGS_DIR) -> None:
    """Write `<folder>/<stage>.json` for every stage and `<folder>/run.json`, each atomically, after all of them
    were computed."""
    for name, text in settings_texts(config).items():
        path = folder / f"{name}.json"
        if not path.is_file() or path.read_text() != text:
            atomic_write_text(path, text)
