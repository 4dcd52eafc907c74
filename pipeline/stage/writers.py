"""The DVC outputs stages write at their very end: metrics JSON and per-epoch CSV, atomically and byte-stable."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from pipeline.files import atomic_write_text
from pipeline.training.loop import EpochRecord


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
