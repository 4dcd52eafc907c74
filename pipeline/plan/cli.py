"""`python -m pipeline.plan [--json] [--suggest] [key=value ...]` (`make plan`): the plan of params.yaml's settings
(or overrides) as a table, or as JSON for scripts. Presentation only: the validate stage does not import it."""

from __future__ import annotations

import argparse
import json
from typing import Dict, List, Optional, Sequence

import torch

from pipeline.config import Config
from pipeline.models import create_model, model_spec
from pipeline.plan.removal import Plan, make_plan
from pipeline.plan.suggest import suggest
from pipeline.settings import load_settings
from pipeline.stage import reported_errors


def plan_for_config(config: Config) -> Plan:
    """The plan of params.yaml's settings: the model built with random weights at the dataset's input shape."""
    spec, num_classes, shape = _architecture(config)
    model = create_model(spec, num_classes, in_channels=shape[0], image_size=shape[-1], **config.model.options)
    return make_plan(model, torch.zeros(1, *shape), config.layer_ratios(), config.prune.skip,
                     config.prune.round_to, spec)


def _architecture(config: Config) -> tuple[str, int, tuple[int, int, int]]:
    from pipeline.data import build_loaders
    info = build_loaders(config.data, batch_size=1, seed=config.seed, device=torch.device("cpu"))[2]
    return model_spec(config.model.name, config.model.factory), info.num_classes, info.input_shape


def print_plan(plan: Plan) -> None:
    """The plan as a rich table plus totals and warnings."""
    from rich.table import Table
    console = _console()
    table = Table(title=f"plan: {plan.model} at input {tuple(plan.input_shape)}", show_lines=False)
    numeric = ("filters", "pruned", "kept", "requested", "actual", "params", "MACs")
    for column in ("layer", "pattern", *numeric, "removed with"):
        table.add_column(column, justify="right" if column in numeric else "left")
    for layer in plan.layers:
        table.add_row(layer.name, layer.pattern, str(layer.filters), str(layer.pruned), str(layer.kept),
                      f"{layer.requested:.2f}", f"{layer.actual:.2f}",
                      f"{_short(layer.params_before)} -> {_short(layer.params_after)}",
                      f"{_short(layer.macs_before)} -> {_short(layer.macs_after)}", ", ".join(layer.removed_with))
    console.print(table)
    console.print(f"params {plan.params_before:,} -> {plan.params_after:,} "
                  f"({plan.params_after / plan.params_before:.1%}); MACs {plan.macs_before:,} -> "
                  f"{plan.macs_after:,} ({plan.macs_before / max(plan.macs_after, 1):.2f}x fewer); removal checked "
                  f"against the masked dense network: max |diff| {plan.max_abs_diff:.2g}", markup=False)
    for layer in plan.layers:
        for note in layer.warnings:
            console.print(f"warning: {layer.name}: {note}", markup=False)
    for note in plan.warnings:
        console.print(f"warning: {note}", markup=False)


def _console():
    """Rich's console, wide enough for the table when the output is piped (rich assumes 80 columns then)."""
    from rich.console import Console
    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=200)


def _short(count: int) -> str:
    """12,345,678 -> '12.3M': a table column that stays narrow."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= size:
            return f"{count / size:.3g}{suffix}"
    return str(count)


def print_suggestions(rows: List[Dict[str, object]]) -> None:
    from rich.table import Table
    console = _console()
    table = Table(title="prunable layer groups (paste a pattern into prune.layers)")
    for column in ("layer", "filters", "kind", "pattern"):
        table.add_column(column)
    for row in rows:
        table.add_row(str(row["layer"]), str(row["filters"]), str(row["kind"]), str(row["pattern"]))
    console.print(table)
    patterns = sorted({str(row["pattern"]) for row in rows if row["pattern"]})
    console.print(f"prune.layers: {json.dumps(patterns)}", markup=False)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.plan", description="What the prune stage will do to the model, before any training.")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (for scripts)")
    parser.add_argument("--suggest", action="store_true", help="list the model's prunable layers and patterns")
    parser.add_argument("overrides", nargs="*", help="settings overrides such as prune.ratio=0.5")
    arguments = parser.parse_args(argv)
    with reported_errors():
        config = load_settings(arguments.overrides)
        if arguments.suggest:
            spec, num_classes, shape = _architecture(config)
            model = create_model(spec, num_classes, in_channels=shape[0], image_size=shape[-1],
                                 **config.model.options)
            rows = suggest(model, torch.zeros(1, *shape))
            print(json.dumps(rows, indent=2)) if arguments.json else print_suggestions(rows)
            return
        plan = plan_for_config(config)
        print(json.dumps(plan.to_dict(), indent=2)) if arguments.json else print_plan(plan)
