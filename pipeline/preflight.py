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
from typing import Dict

from pipeline.config import Config
from pipeline.files import atomic_write_text
from pipeline.models import create_model
from pipeline.runtime import resolve_device, resolve_runtime
from pipeline.stage import STAGE_SETTINGS, stage_settings
from pipeline.training import distributed

SETTINGS_DIR = Path("settings")
# Batch sizes that DDP splits over `trainer.devices` processes.
SPLIT_BATCHES = ("pretrain.batch_size", "prune.batch_size", "retrain.batch_size")
# Any class count builds the network; the real one comes from the data, which this stage does not read.
PROBE_CLASSES = 2


def check_runnable(config: Config) -> None:
    """Cross-checks that need neither data nor any GPU work: the device exists here, the precision, step mode and
    process count suit it, every batch splits over the processes, and the model accepts its options."""
    device = resolve_device(config.device)
    distributed.check_devices(config.trainer.devices, device)
    resolve_runtime(config.trainer, device, config.amp)
    if config.trainer.devices > 1:
        for key in SPLIT_BATCHES:
            section, name = key.split(".")
            distributed.local_batch_size(getattr(getattr(config, section), name), config.trainer.devices, key)
    create_model(config.model.name, PROBE_CLASSES, **config.model.options)


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
