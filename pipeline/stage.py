"""What every stage script shares: the entry point, the run set-up, artifact paths and writers.

Stage scripts stay thin: they read settings, call library functions and write their declared outputs, always
at the very end and atomically, so a stage refused for bad input or killed midway leaves no half-written file.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from pipeline.config import Config
from pipeline.settings import load_settings
from pipeline.errors import PipelineError
from pipeline.files import atomic_write_text
from pipeline.progress import console
from pipeline.runtime import check_amp, resolve_device, seed_everything
from pipeline.training.loop import EpochRecord

DENSE_CHECKPOINT = Path("models/dense.pt")
PRUNED_CHECKPOINT = Path("models/pruned.pt")
FINAL_CHECKPOINT = Path("models/final.pt")
PRUNED_LAYERS = Path("models/pruned_layers.json")
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")
REPORTS_DIR = Path("reports")


def run_stage(main: Callable[[Config], None], argv: Sequence[str] | None = None) -> None:
    """Load and validate params.yaml (plus `key=value` overrides), run the stage, and turn user errors into
    one readable paragraph and exit status 2 instead of a traceback."""
    try:
        main(load_settings(list(sys.argv[1:] if argv is None else argv)))
    except PipelineError as error:
        console.print(f"[bold red]error:[/] {error}", soft_wrap=True)
        sys.exit(2)


def prepare_run(config: Config) -> torch.device:
    """Device checks and seeding, before any data or model is touched."""
    device = resolve_device(config.device)
    check_amp(config.amp, device)
    seed_everything(config.seed)
    return device


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
