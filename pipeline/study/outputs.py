"""What a study writes: per-cell tables, a report laid out like the paper's Table 1, and comparison plots.

Every figure is a mean over seeds with the sample standard deviation beside it. Accuracy is the best test accuracy
during retraining, as the paper reports it; epoch 0 of a retraining curve is the network right after pruning.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import matplotlib

from pipeline.files import atomic_write_text
from pipeline.report import save_figure

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
from matplotlib.ticker import MaxNLocator  # noqa: E402

Result = Mapping[str, Any]
CELL_COLUMNS = ("method", "ratio", "schedule", "seed", "dense_acc", "pruned_acc", "best_acc", "final_acc",
                "jsv_dense", "jsv_pruned", "jsv_final", "params_dense", "params_pruned", "macs_dense", "macs_pruned")
JSV_MODE_NOTE = ("Measured in eval mode (BatchNorm running statistics, each sample on its own); the paper's reference "
                 "measures in train mode (batch statistics), so the values are not comparable with its JSV figures.")
CURVE_COLUMNS = ("method", "ratio", "schedule", "seed", "epoch", "test_acc", "train_loss", "mean_jsv")
MAX_EPOCH_COLUMNS = 13


def mean_std(values: Iterable[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _ordered(results: Sequence[Result], key: str) -> List[Any]:
    """The distinct values of `key` in the order the study file lists them (results keep that order)."""
    return list(dict.fromkeys(result[key] for result in results))


def _groups(results: Sequence[Result], *keys: str) -> Dict[Tuple[Any, ...], List[Result]]:
    grouped: Dict[Tuple[Any, ...], List[Result]] = defaultdict(list)
    for result in results:
        grouped[tuple(result[key] for key in keys)].append(result)
    return grouped


def curve(results: Sequence[Result], field: str, start: Callable[[Result], Optional[float]]) -> List[List[float]]:
    """Per epoch (0 = right after pruning, from `start`), the values of `field` across the cells given."""
    epochs = min(len(result["history"]) for result in results)
    rows = [[start(result) for result in results]]
    rows += [[result["history"][epoch][field] for result in results] for epoch in range(epochs)]
    return rows


def write_study_outputs(name: str, description: str, results: Sequence[Result], folder: Path) -> None:
    """cells.csv, curves.csv, report.md and the PNG figures, written whole into `folder`."""
    _write_csv(folder / "cells.csv", CELL_COLUMNS, results)
    _write_csv(folder / "curves.csv", CURVE_COLUMNS,
               [{**result, **row} for result in results for row in result["history"]])
    has_jsv = all(result["jsv_final"] is not None for result in results)
    figures = [_accuracy_vs_ratio(results, folder / "accuracy_vs_ratio.png"),
               _retraining_curves(results, "test_acc", lambda r: r["pruned_acc"], "test accuracy (%)",
                                  folder / "retrain_curves.png")]
    if has_jsv:
        figures.append(_retraining_curves(results, "mean_jsv", lambda r: r["jsv_pruned"],
                                          "mean Jacobian singular value", folder / "jsv_curves.png", log=True))
    atomic_write_text(folder / "report.md", study_markdown(name, description, results, has_jsv,
                                                           [figure for figure in figures if figure]))


def study_markdown(name: str, description: str, results: Sequence[Result], has_jsv: bool,
                   figures: Sequence[str]) -> str:
    """The whole report: Table 1 layout, trainability, per-epoch accuracy at the highest ratio, figures."""
    seeds = _ordered(results, "seed")
    lines = [f"# Study `{name}`", "", *([description.strip(), ""] if description.strip() else []),
             f"{len(results)} cells; every figure is the mean ± sample std (n − 1) over {len(seeds)} seed(s) "
             f"({', '.join(map(str, seeds))}); the paper's ± is a population std (n), smaller by √((n − 1)/n). "
             f"Accuracy: best test accuracy (%) during retraining, as the paper reports it.", "",
             "## Accuracy (Table 1 layout)", "", *table1(results), ""]
    if has_jsv:
        lines += ["## Trainability (mean Jacobian singular value)", "", JSV_MODE_NOTE, "",
                  *trainability_table(results), ""]
    lines += [f"## Accuracy per retraining epoch at ratio {max(r['ratio'] for r in results):g}", "",
              "Epoch 0 is the network right after pruning.", "", *epoch_table(results), ""]
    lines += [f"![{Path(figure).stem}]({figure})" for figure in figures] + [""]
    return "\n".join(lines)


def table1(results: Sequence[Result]) -> List[str]:
    """Columns = pruning ratios; a sparsity / speed-up row, the dense accuracy, then one block of methods per
    retraining schedule, the best mean of each column in bold."""
    ratios = _ordered(results, "ratio")
    by_ratio = _groups(results, "ratio")
    header = ["| | " + " | ".join(f"PR {ratio:g}" for ratio in ratios) + " |", "|---" * (len(ratios) + 1) + "|"]
    sizes = [_size_cell(by_ratio[(ratio,)]) for ratio in ratios]
    dense = _format(*mean_std(_per_seed(results, "dense_acc")))
    rows = [f"| sparsity / speed-up (MACs) | {' | '.join(sizes)} |",
            f"| dense | {' | '.join([dense] * len(ratios))} |"]
    cells = _groups(results, "schedule", "method", "ratio")
    for schedule in _ordered(results, "schedule"):
        rows.append(f"| *{schedule}* |" + " |" * len(ratios))
        methods = _ordered([r for r in results if r["schedule"] == schedule], "method")
        stats = {(method, ratio): mean_std(r["best_acc"] for r in cells[(schedule, method, ratio)])
                 for method in methods for ratio in ratios}
        best = {ratio: max(stats[(method, ratio)][0] for method in methods) for ratio in ratios}
        for method in methods:
            values = [_format(*stats[(method, ratio)], bold=stats[(method, ratio)][0] == best[ratio])
                      for ratio in ratios]
            rows.append(f"| {method} | {' | '.join(values)} |")
    return header + rows


def trainability_table(results: Sequence[Result]) -> List[str]:
    """Mean JSV of the dense network, right after pruning and after retraining, beside the accuracies."""
    rows = ["| schedule | method | PR | JSV dense | JSV after pruning | JSV after retraining | acc. after pruning | "
            "acc. after epoch 1 | best acc. |", "|---|---|---|---|---|---|---|---|---|"]
    for (schedule, method, ratio), group in _groups(results, "schedule", "method", "ratio").items():
        jsv = [_scientific(statistics.fmean(r[key] for r in group)) for key in ("jsv_dense", "jsv_pruned",
                                                                                  "jsv_final")]
        accuracy = [_format(*mean_std(values)) for values in ([r["pruned_acc"] for r in group],
                                                             [r["history"][0]["test_acc"] for r in group],
                                                             [r["best_acc"] for r in group])]
        rows.append(f"| {schedule} | {method} | {ratio:g} | {' | '.join(jsv + accuracy)} |")
    return rows


def epoch_table(results: Sequence[Result]) -> List[str]:
    """Mean test accuracy per retraining epoch at the highest ratio, one row per schedule and method."""
    highest = [r for r in results if r["ratio"] == max(r["ratio"] for r in results)]
    groups = _groups(highest, "schedule", "method")
    epochs = min(len(r["history"]) for r in highest)
    shown = _epochs_shown(epochs)
    rows = ["| schedule | method | " + " | ".join(f"ep {epoch}" for epoch in shown) + " |",
            "|---|---|" + "---|" * len(shown)]
    for (schedule, method), group in groups.items():
        means = [statistics.fmean(values) for values in curve(group, "test_acc", lambda r: r["pruned_acc"])]
        rows.append(f"| {schedule} | {method} | " + " | ".join(f"{means[epoch]:.2f}" for epoch in shown) + " |")
    return rows


def _epochs_shown(epochs: int) -> List[int]:
    """Every epoch 0..E when few, else about a dozen spread evenly, always with the first and the last."""
    if epochs + 1 <= MAX_EPOCH_COLUMNS:
        return list(range(epochs + 1))
    step = epochs / (MAX_EPOCH_COLUMNS - 1)
    return sorted({round(index * step) for index in range(MAX_EPOCH_COLUMNS)} | {0, epochs})


def _per_seed(results: Sequence[Result], key: str) -> List[float]:
    """One value per seed (a dense network is shared by every cell of its seed)."""
    return [group[0][key] for group in _groups(results, "seed").values()]


def _size_cell(group: Sequence[Result]) -> str:
    sparsity = 1 - statistics.fmean(r["params_pruned"] / r["params_dense"] for r in group)
    speedup = statistics.fmean(r["macs_dense"] / r["macs_pruned"] for r in group)
    return f"{100 * sparsity:.1f}% / {speedup:.2f}×"


def _format(mean: float, std: float, bold: bool = False) -> str:
    text = f"{mean:.2f} ± {std:.2f}"
    return f"**{text}**" if bold else text


def _scientific(value: float) -> str:
    return f"{value:.3g}"


def _write_csv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _panels(results: Sequence[Result]) -> Tuple[plt.Figure, Dict[str, plt.Axes]]:
    """One panel per retraining schedule, side by side."""
    schedules = _ordered(results, "schedule")
    figure, axes = plt.subplots(1, len(schedules), figsize=(5 * len(schedules), 3.8), squeeze=False,
                                sharey=True)
    return figure, dict(zip(schedules, axes[0]))


def _accuracy_vs_ratio(results: Sequence[Result], path: Path) -> Optional[str]:
    """Best accuracy against the pruning ratio, per method; None (no figure) for a single ratio."""
    ratios = _ordered(results, "ratio")
    if len(ratios) < 2:
        return None
    figure, panels = _panels(results)
    dense, _ = mean_std(_per_seed(results, "dense_acc"))
    cells = _groups(results, "schedule", "method", "ratio")
    for schedule, axis in panels.items():
        for method in _ordered([r for r in results if r["schedule"] == schedule], "method"):
            stats = [mean_std(r["best_acc"] for r in cells[(schedule, method, ratio)]) for ratio in ratios]
            axis.errorbar(ratios, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", markersize=4,
                          capsize=3, label=method)
        axis.axhline(dense, color="gray", linestyle="--", linewidth=1, label="dense")
        _label(axis, schedule, "pruning ratio", "best test accuracy (%)")
    return _finish(figure, path)


def _retraining_curves(results: Sequence[Result], field: str, start: Callable[[Result], Optional[float]],
                       ylabel: str, path: Path, log: bool = False) -> str:
    """`field` per retraining epoch at the highest ratio, mean line and ±std band per method."""
    highest_ratio = max(r["ratio"] for r in results)
    highest = [r for r in results if r["ratio"] == highest_ratio]
    figure, panels = _panels(highest)
    groups = _groups(highest, "schedule", "method")
    for schedule, axis in panels.items():
        for (group_schedule, method), group in groups.items():
            if group_schedule != schedule:
                continue
            stats = [mean_std(values) for values in curve(group, field, start)]
            epochs = range(len(stats))
            means = [m for m, _ in stats]
            line, = axis.plot(epochs, means, marker="o", markersize=3, label=method)
            axis.fill_between(epochs, [m - s for m, s in stats], [m + s for m, s in stats],
                              color=line.get_color(), alpha=0.15)
        if log:
            axis.set_yscale("log")
            axis.axhline(statistics.fmean(r["jsv_dense"] for r in highest), color="gray", linestyle="--",
                         linewidth=1, label="dense")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        _label(axis, f"{schedule}, ratio {highest_ratio:g}", "retraining epoch (0 = right after pruning)", ylabel)
    return _finish(figure, path)


def _label(axis: plt.Axes, title: str, xlabel: str, ylabel: str) -> None:
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)


def _finish(figure: plt.Figure, path: Path) -> str:
    figure.tight_layout()
    save_figure(figure, path)
    return path.name
