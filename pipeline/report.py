"""The human-readable end of the pipeline: an accuracy chart and a short Markdown report."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping

import matplotlib

from pipeline.files import atomic_write_text

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)


def read_history(path: Path) -> List[Dict[str, float]]:
    """Rows of a per-epoch CSV written by a stage, as floats."""
    with open(path, newline="") as handle:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(handle)]


def accuracy_chart(histories: Mapping[str, List[Dict[str, float]]], path: Path) -> None:
    """Test accuracy per epoch, one panel per training phase, saved as PNG."""
    phases = {name: rows for name, rows in histories.items() if rows}
    figure, axes = plt.subplots(1, len(phases), figsize=(4.5 * len(phases), 3.5), squeeze=False)
    for axis, (name, rows) in zip(axes[0], phases.items()):
        axis.plot([row["epoch"] for row in rows], [row["test_acc"] for row in rows], marker="o", markersize=3)
        axis.set_title(name)
        axis.set_xlabel("epoch")
        axis.set_ylabel("test accuracy (%)")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    save_figure(figure, path)


def markdown_report(metrics: Mapping[str, Any], path: Path) -> None:
    """A one-screen summary of what pruning cost and bought."""
    lines = [
        f"# TPP pipeline report: {metrics['model']} on {metrics['dataset']}",
        "",
        f"Method `{metrics['method']}`, {metrics['pruned_filters']} filters removed; "
        f"latency measured on `{metrics['device']}` at batch {metrics['latency_batch_size']}.",
        "",
        "| | dense | pruned |",
        "|---|---|---|",
        f"| test accuracy (%) | {metrics['dense_acc']:.2f} | {metrics['final_acc']:.2f} "
        f"(best {metrics['best_retrain_acc']:.2f}; {metrics['pruned_acc']:.2f} right after pruning) |",
        f"| parameters | {metrics['params_dense']:,} | {metrics['params_pruned']:,} |",
        f"| MACs | {metrics['macs_dense']:,} | {metrics['macs_pruned']:,} |",
        f"| latency (ms) | {metrics['latency_dense_ms']:.3f} | {metrics['latency_pruned_ms']:.3f} |",
        *_trainability_row(metrics),
        "",
        f"Parameter sparsity {100 * metrics['sparsity']:.1f}%, speed-up {metrics['speedup_macs']:.2f}× in MACs and "
        f"{metrics['speedup_latency']:.2f}× measured.",
        "",
        "![test accuracy per epoch](accuracy.png)",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def _trainability_row(metrics: Mapping[str, Any]) -> List[str]:
    """The mean JSV row, when the evaluate stage measured it (trainability.jsv_samples > 0)."""
    if "jsv_dense" not in metrics:
        return []
    return [f"| mean Jacobian singular value | {metrics['jsv_dense']:.4g} | {metrics['jsv_final']:.4g} "
            f"({metrics['jsv_pruned']:.4g} right after pruning) |"]


def save_figure(figure: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(temporary, dpi=100, metadata={"Software": None})
    plt.close(figure)
    os.replace(temporary, path)
