"""The human-readable end of the pipeline: an accuracy chart and a short Markdown report."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

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


def markdown_report(metrics: Mapping[str, Any], latency: Mapping[str, Any], path: Path) -> None:
    """A one-screen summary of what pruning cost and bought: accuracy, size, MACs, and measured latency per
    deployment target beside the MAC speed-up."""
    lines = [
        f"# TPP pipeline report: {metrics['model']} on {metrics['dataset']}",
        "",
        f"Method `{metrics['method']}`, {metrics['pruned_filters']} filters removed.",
        "",
        "| | dense | pruned |",
        "|---|---|---|",
        f"| test accuracy (%) | {metrics['dense_acc']:.2f} | {metrics['final_acc']:.2f} "
        f"(best {metrics['best_retrain_acc']:.2f}; {metrics['pruned_acc']:.2f} right after pruning) |",
        f"| parameters | {metrics['params_dense']:,} | {metrics['params_pruned']:,} |",
        f"| MACs | {metrics['macs_dense']:,} | {metrics['macs_pruned']:,} |",
        *_trainability_row(metrics),
        "",
        f"Parameter sparsity {100 * metrics['sparsity']:.1f}%, speed-up {metrics['speedup_macs']:.2f}× in MACs.",
        "",
        *latency_table(latency),
        "",
        "![test accuracy per epoch](accuracy.png)",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def latency_record(comparisons: Sequence[Any], environment: Mapping[str, Any], speedup_macs: float,
                   onnx_max_abs_diff: float, failed: Optional[Mapping[str, str]] = None,
                   skipped: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """Every measured time of the evaluate stage, kept apart from the deterministic metrics (times change from run
    to run): per target and batch, with the machine and library versions they were measured with; the targets
    that failed (with their error) and those not timed on this device (with the reason)."""
    targets: Dict[str, Dict[str, Any]] = {}
    for comparison in comparisons:
        targets.setdefault(comparison.target, {})[f"batch_{comparison.batch_size}"] = comparison.to_dict()
    return {**environment, "speedup_macs": speedup_macs, "onnx_max_abs_diff": onnx_max_abs_diff, "targets": targets,
            "failed": dict(failed or {}), "skipped": dict(skipped or {})}


def summary_record(metrics: Mapping[str, Any], latency: Mapping[str, Any], batch_size: int) -> Dict[str, float]:
    """The handful of numbers people compare runs by: accuracy dense / right after pruning / final, MAC speed-up,
    measured speed-up per target at the throughput batch, and the mean JSV. Each under the same name as in
    metrics/evaluate.json, so MLflow and `dvc exp show` show one name per number."""
    summary = {key: metrics[key] for key in ("dense_acc", "pruned_acc", "final_acc", "speedup_macs")}
    summary.update({f"speedup_{target}": batches[f"batch_{batch_size}"]["speedup"]
                    for target, batches in latency["targets"].items()})
    summary.update({key: metrics[key] for key in ("jsv_dense", "jsv_pruned", "jsv_final") if key in metrics})
    return summary


def latency_table(latency: Mapping[str, Any]) -> List[str]:
    """Measured latency per target and batch (median ± IQR), the speed-up beside the MAC speed-up, and what it
    was measured on."""
    lines = ["## Measured latency (BatchNorm folded on both sides, median ± IQR over interleaved rounds)", "",
             "| target | batch | dense (ms) | pruned (ms) | speed-up | MAC speed-up |", "|---|---|---|---|---|---|"]
    for target, batches in latency["targets"].items():
        for batch, row in batches.items():
            lines.append(f"| {target} | {batch.removeprefix('batch_')} | {row['dense_ms']:.3f} ± "
                         f"{row['dense_iqr_ms']:.3f} | {row['pruned_ms']:.3f} ± {row['pruned_iqr_ms']:.3f} | "
                         f"{row['speedup']:.2f}× ± {row['speedup_iqr']:.2f} | {latency['speedup_macs']:.2f}× |")
    lines += [f"| {target} | | failed: {error} | | | |" for target, error in latency.get("failed", {}).items()]
    versions = ", ".join(f"{name} {latency[name]}" for name in ("torch", "onnxruntime", "onnx"))
    lines += ["", f"Measured on `{latency['device']}` ({latency['device_name']}; {latency['torch_threads']} torch "
                  f"threads), {versions}. ONNX export (`models/final.onnx`) max abs difference from PyTorch: "
                  f"{latency['onnx_max_abs_diff']:.2g}."]
    return lines


def _trainability_row(metrics: Mapping[str, Any]) -> List[str]:
    """The mean JSV row, when the evaluate stage measured it (trainability.jsv_samples > 0)."""
    if "jsv_dense" not in metrics:
        return []
    return [f"| mean Jacobian singular value (eval mode: BatchNorm running statistics; the paper's reference "
            f"measures in train mode) | {metrics['jsv_dense']:.4g} | {metrics['jsv_final']:.4g} "
            f"({metrics['jsv_pruned']:.4g} right after pruning) |"]


def save_figure(figure: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(temporary, dpi=100, metadata={"Software": None})
    plt.close(figure)
    os.replace(temporary, path)
