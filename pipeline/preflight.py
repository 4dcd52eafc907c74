"""The pipeline's first stage: every setting checked before any stage that reads it starts, and each stage's
resolved settings written to its own file.

DVC removes a stage's outputs just before running it, so a bad value found by the stage itself would already
have cost the user its previous outputs. The validate stage depends on all of params.yaml and runs first; the
other stages depend on `settings/<stage>.json` instead of params keys. A bad value therefore stops DVC before any
output is touched, and since each file holds exactly the settings its stage reads (`pipeline.stage.stage_settings`),
a stage reruns exactly when those settings change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import yaml

from pipeline.config import Config
from pipeline.errors import CheckpointError
from pipeline.files import atomic_write_text
from pipeline.models import create_model
from pipeline.runtime import resolve_device, resolve_runtime
from pipeline.stage import STAGE_SETTINGS, stage_settings
from pipeline.training import distributed

SETTINGS_DIR = Path("settings")
PIPELINE_FILE = Path("dvc.yaml")
# Batch sizes that DDP splits over `trainer.devices` × `trainer.nodes` processes.
SPLIT_BATCHES = ("pretrain.batch_size", "prune.batch_size", "retrain.batch_size")
# Any class count builds the network; the real one comes from the data, which this stage does not read.
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
    create_model(config.model.name, PROBE_CLASSES, **config.model.options)


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


def _pretrain_dependencies(root: Path) -> List[str]:
    """The pretrain stage's dependencies as dvc.yaml lists them (none outside a DVC project)."""
    pipeline_file = root / PIPELINE_FILE
    if not pipeline_file.is_file():
        return []
    stages = yaml.safe_load(pipeline_file.read_text()).get("stages", {})
    return [str(dependency) for dependency in stages.get("pretrain", {}).get("deps", [])]


def resolved_settings(config: Config) -> Dict[str, str]:
    """Each stage's settings file as text: sorted keys and fixed formatting, so equal settings give equal bytes
    and DVC sees no change in a stage whose settings did not change."""
    return {stage: json.dumps(stage_settings(config, stage), indent=2, sort_keys=True) + "\n"
            for stage in STAGE_SETTINGS}


def write_stage_settings(config: Config, folder: Path = SETTINGS_DIR) -> None:
    """Write `<folder>/<stage>.json` for every stage, each atomically, after all of them were computed."""
    texts = resolved_settings(config)
    for stage, text in texts.items():
        path = folder / f"{stage}.json"
        if not path.is_file() or path.read_text() != text:
            atomic_write_text(path, text)
