"""A stage script's entry point and run set-up: its settings read, a training stage launched under torchrun when
several devices or nodes are asked for (evaluate, which trains nothing, always runs once), devices, numerics and
seeding prepared before any data or model is touched."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Sequence

from pipeline.config import Config
from pipeline.runtime import Runtime, configure_numerics, resolve_device, resolve_runtime, seed_everything
from pipeline.settings_files import load_stage_config
from pipeline.stage.failure import reported_errors
from pipeline.stage.paths import RESUME_DIR, WRITTEN_FOLDERS
from pipeline.storage import check_writable
from pipeline.threads import use_thread_share
from pipeline.training import distributed, launcher


def run_stage(main: Callable[[Config], None], argv: Sequence[str] | None = None, stage: str | None = None, *,
              trains: bool = True) -> None:
    """Read the stage's resolved settings (plus `key=value` overrides for debugging), run the stage (a training
    stage under torchrun when `trainer.devices` × `trainer.nodes` > 1; a stage that `trains` nothing, such as
    evaluate, always once, with the machine's threads), and turn user errors into one readable paragraph and exit
    status 2 instead of a traceback. The stage is named after its script (stages/<stage>.py) unless given."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        with reported_errors():
            config = load_stage_config(stage or Path(sys.argv[0]).stem, arguments)
            check_writable(WRITTEN_FOLDERS)
            trainer = config.trainer
            if trains and trainer.devices * trainer.nodes > 1 and not distributed.under_launcher():
                distributed.check_devices(trainer.devices, resolve_device(config.device))
                sys.exit(launcher.launch(trainer.devices, trainer.nodes, sys.argv[0], arguments))
            main(config)
    finally:
        distributed.stop_process_group()


def prepare_run(config: Config) -> Runtime:
    """Device checks, the process group under torchrun, numerics and seeding, before any data or model is
    touched."""
    device = resolve_device(config.device)
    distributed.check_devices(config.trainer.devices, device)
    rank, world_size, device = distributed.start_process_group(device)
    distributed.check_shared_workspace(RESUME_DIR)
    configure_numerics(config.trainer, device)
    use_thread_share(Path(sys.argv[0]).stem)
    seed_everything(config.seed)
    return resolve_runtime(config.trainer, device, config.amp, rank, world_size)
