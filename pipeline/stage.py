"""What every stage script shares: the entry point, the run set-up, artifact paths, resume files and writers.

Stage scripts stay thin: they read settings, call library functions and write their declared outputs, always
at the very end, atomically and from the main process only, so a stage refused for bad input or killed midway
leaves no half-written file. A training stage asked for several devices or nodes relaunches itself under
torchrun; evaluate, which trains nothing, always runs once.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, NoReturn, Optional, Sequence

from rich.markup import escape

from pipeline.config import Config, config_to_dict
from pipeline.errors import PipelineError
from pipeline.files import atomic_write_text
from pipeline.fingerprint import code_fingerprint, files_fingerprint, fingerprint
from pipeline.progress import console
from pipeline.runtime import Runtime, configure_numerics, resolve_device, resolve_runtime, seed_everything
from pipeline.settings import load_settings
from pipeline.storage import check_writable, explain
from pipeline.training import distributed, launcher
from pipeline.training.loop import EpochRecord
from pipeline.training.state import ResumeFile

DENSE_CHECKPOINT = Path("models/dense.pt")
PRUNED_CHECKPOINT = Path("models/pruned.pt")
FINAL_CHECKPOINT = Path("models/final.pt")
PRUNED_LAYERS = Path("models/pruned_layers.json")
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")
REPORTS_DIR = Path("reports")
RESUME_DIR = Path("resume")
# Every folder a stage writes, probed before it starts so that an unwritable or full disk costs no work.
WRITTEN_FOLDERS = (DENSE_CHECKPOINT.parent, METRICS_DIR, PLOTS_DIR, REPORTS_DIR, RESUME_DIR)

# The settings each stage reads (dotted keys select part of a section). dvc.yaml's dependencies, the resolved
# settings files and the resume fingerprints all derive from this one table.
STAGE_SETTINGS: Dict[str, Sequence[str]] = {
    "pretrain": ("seed", "device", "amp", "trainer", "data", "model", "pretrain"),
    "prune": ("seed", "device", "amp", "trainer", "data", "prune"),
    "retrain": ("seed", "device", "amp", "trainer", "data", "retrain", "trainability"),
    "evaluate": ("seed", "device", "amp", "trainer", "data", "model.name", "prune.method", "trainability",
                 "evaluate"),
}
# Settings that change how a run proceeds but never what it produces: left out of what stages depend on.
RUN_ONLY_SETTINGS = ("trainer.checkpoint_every", "trainer.resume")


def run_stage(main: Callable[[Config], None], argv: Sequence[str] | None = None, *, trains: bool = True) -> None:
    """Load and validate params.yaml (plus `key=value` overrides), run the stage (a training stage under torchrun
    when `trainer.devices` > 1; a stage that `trains` nothing, such as evaluate, always once, with the machine's
    threads), and turn user errors into one readable paragraph and exit status 2 instead of a traceback."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        with reported_errors():
            config = load_settings(arguments)
            check_writable(WRITTEN_FOLDERS)
            trainer = config.trainer
            if trains and trainer.devices * trainer.nodes > 1 and not distributed.under_launcher():
                distributed.check_devices(trainer.devices, resolve_device(config.device))
                sys.exit(launcher.launch(trainer.devices, trainer.nodes, sys.argv[0], arguments))
            main(config)
    finally:
        distributed.stop_process_group()


@contextmanager
def reported_errors() -> Iterator[None]:
    """User errors (settings, data, checkpoints, an unwritable or full disk) as one paragraph and exit status 2
    instead of a traceback; anything else is a bug and keeps its traceback."""
    try:
        yield
    except PipelineError as error:
        _fail(str(error))
    except OSError as error:
        message = explain(error)
        if message is None:
            raise
        _fail(message)


def _fail(message: str) -> NoReturn:
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    sys.exit(2)


def prepare_run(config: Config) -> Runtime:
    """Device checks, the process group under torchrun, numerics and seeding, before any data or model is
    touched."""
    device = resolve_device(config.device)
    distributed.check_devices(config.trainer.devices, device)
    rank, world_size, device = distributed.start_process_group(device)
    distributed.check_shared_workspace(RESUME_DIR)
    configure_numerics(config.trainer, device)
    seed_everything(config.seed)
    return resolve_runtime(config.trainer, device, config.amp, rank, world_size)


def stage_settings(config: Config, stage: str) -> Dict[str, Any]:
    """The resolved values of exactly the settings `stage` reads, without the run-only ones."""
    settings = config_to_dict(config)
    selected: Dict[str, Any] = {}
    for key in STAGE_SETTINGS[stage]:
        value: Any = settings
        for part in key.split("."):
            value = value[part]
        selected[key] = _without_run_only(value, key)
    return selected


def _without_run_only(value: Any, key: str) -> Any:
    if not isinstance(value, dict):
        return value
    return {name: _without_run_only(item, f"{key}.{name}") for name, item in value.items()
            if f"{key}.{name}" not in RUN_ONLY_SETTINGS}


def resume_file(stage: str, config: Config, inputs: Iterable[Path] = ()) -> Optional[ResumeFile]:
    """The stage's resume file, valid only for these settings, this data, this code and these input checkpoints;
    None when `trainer.resume` is off."""
    if not config.trainer.resume:
        return None
    def parts() -> Dict[str, Any]:
        return {"stage": stage, "settings": stage_settings(config, stage), "code": code_fingerprint(),
                "data": files_fingerprint([Path(config.data.root)], content=False),
                "inputs": files_fingerprint(inputs, content=True)}

    return ResumeFile(RESUME_DIR / f"{stage}.pt", distributed.on_main(lambda: fingerprint(parts())),
                      announce=lambda line: console.print(f"[{stage}] {line}", markup=False, soft_wrap=True))


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Metrics file for DVC, written atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_history(path: Path, history: Iterable[EpochRecord]) -> None:
    """Per-epoch CSV that `dvc plots` draws (x: epoch), written atomically. Wall time is left out (it is in the
    log and MLflow) so that identical runs write identical files and DVC sees no change."""
    rows = [{"epoch": record.epoch, "step": record.step,
             **{key: value for key, value in record.metrics().items() if key != "seconds"}} for record in history]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["epoch"], lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: _rounded(value) for key, value in row.items()} for row in rows)
    atomic_write_text(path, buffer.getvalue())


def _rounded(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value
