"""Benchmark: is a pruned network faster than its dense network where it runs, with the paper's exact kept-filter
counts and with counts aligned by `prune.round_to`? A measurement script, not a test: it prints figures.

    .venv/bin/python benchmarks/pruned_latency.py [--device cpu|cuda] [--networks resnet50_2.31x ...]
        [--round-to 1 8] [--targets eager graph compile onnxruntime] [--repeats N] [--json PATH]

Each network is pruned by `select_filters` + `remove_filters` exactly as the prune stage does (random weights:
only the kept counts matter for speed) and timed against its dense network with `measure_targets`, the evaluate
stage's own measurement: both BatchNorm-folded, interleaved rounds, median speed-up of paired rounds with its IQR,
at batch 1 and the network's throughput batch; bf16 autocast and channels_last on CUDA, fp32 on the CPU. The goal
of issue 9 reads off the `graph_cuda` and `compile_cuda` columns: with round_to 8, never below 1×.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from pipeline.config import TrainerConfig
from pipeline.measure.cost import count_macs
from pipeline.measure.latency import TARGETS, LatencyComparison, available_targets, environment, measure_targets
from pipeline.models import create_model
from pipeline.pruning.selection import select_filters
from pipeline.pruning.surgery import remove_filters
from pipeline.runtime import configure_numerics, resolve_device


@dataclass(frozen=True)
class PrunedNetwork:
    """A network of the paper's tables: the model, its input and throughput batch, and its layer ratios."""

    model: str
    num_classes: int
    image_size: int
    throughput_batch: int
    ratios: Mapping[str, float]


NETWORKS = {
    "resnet50_2.31x": PrunedNetwork("resnet50", 1000, 224, 256,
                                    {"*layer[1-3]*conv[1-2]": 0.6, "*layer4*conv[1-2]": 0.21}),
    "resnet50_1.49x": PrunedNetwork("resnet50", 1000, 224, 256,
                                    {"*layer[1-3]*conv[1-2]": 0.3, "*layer4*conv[1-2]": 0.14}),
    "resnet56_0.9": PrunedNetwork("resnet56", 10, 32, 1024, {"*layer*.conv1": 0.9}),
}


@dataclass(frozen=True)
class Row:
    network: str
    round_to: int
    mac_speedup: float
    comparisons: Sequence[LatencyComparison]
    failed: Mapping[str, str]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--networks", nargs="+", choices=sorted(NETWORKS), default=sorted(NETWORKS))
    parser.add_argument("--round-to", type=int, nargs="+", default=[1, 8], help="prune.round_to values compared")
    parser.add_argument("--targets", nargs="+", choices=TARGETS,
                        help="deployment targets (default: every one this machine has)")
    parser.add_argument("--batch-size", type=int, help="override every network's throughput batch")
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per target and batch")
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU, and this machine has none (leave --device out to run on CPU)")
    available = available_targets(torch.device(args.device))
    if args.targets and not set(args.targets) <= set(available):
        parser.error(f"--targets {' '.join(args.targets)}: on {args.device} this machine can time "
                     f"{' '.join(available)} (graph and compile need CUDA)")
    return args


def pruned_pair(network: PrunedNetwork, round_to: int, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """The dense network (seeded, so every round_to prunes the same weights) and its physically pruned copy."""
    torch.manual_seed(0)
    dense = create_model(network.model, network.num_classes, image_size=network.image_size).eval()
    example = example_input(network)
    pruned = copy.deepcopy(dense)
    remove_filters(pruned, select_filters(pruned, network.ratios, example_inputs=example, round_to=round_to), example)
    return dense.to(device), pruned.to(device)


def example_input(network: PrunedNetwork) -> torch.Tensor:
    return torch.zeros(1, 3, network.image_size, network.image_size)


def measure(name: str, round_to: int, args: argparse.Namespace, device: torch.device) -> Row:
    network = NETWORKS[name]
    dense, pruned = pruned_pair(network, round_to, device)
    example = example_input(network)
    mac_speedup = count_macs(dense.cpu(), example) / count_macs(pruned.cpu(), example)
    cuda = device.type == "cuda"
    measured = measure_targets(dense, pruned, example.to(device), device, "bf16" if cuda else "fp32",
                               [1, args.batch_size or network.throughput_batch], args.repeats,
                               channels_last=cuda, targets=args.targets)
    return Row(name, round_to, mac_speedup, measured.comparisons, measured.failed)


def table(rows: Sequence[Row], device: torch.device) -> Table:
    result = Table(title=f"pruned ÷ dense latency on {device}: speed-up (median of paired rounds ± IQR)")
    for column in ("network", "round_to", "MACs ×", "target", "batch", "dense ms", "pruned ms", "speed-up"):
        result.add_column(column, justify="left" if column in ("network", "target") else "right")
    for row in rows:
        for comparison in row.comparisons:
            verdict = "" if comparison.speedup >= 1 else " [slower]"
            result.add_row(row.network, str(row.round_to), f"{row.mac_speedup:.2f}", comparison.target,
                           str(comparison.batch_size), f"{comparison.dense_ms:.3f}", f"{comparison.pruned_ms:.3f}",
                           f"{comparison.speedup:.2f}× ± {comparison.speedup_iqr:.2f}{verdict}")
        for target, error in row.failed.items():
            result.add_row(row.network, str(row.round_to), f"{row.mac_speedup:.2f}", target, "", "", "",
                           f"failed: {error}")
    return result


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    configure_numerics(TrainerConfig(), device)
    console = Console()
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    env = environment(device) | {"command": command, "targets": list(args.targets or available_targets(device))}
    console.print(env)
    rows: List[Row] = []
    for name in args.networks:
        for round_to in args.round_to:
            rows.append(measure(name, round_to, args, device))
            console.print(f"measured {name} round_to {round_to}", style="dim")
    console.print(table(rows, device))
    console.print(f"Reproduce with: {command}")
    if args.json:
        figures: Dict[str, object] = {"environment": env, "rows": [
            {"network": row.network, "round_to": row.round_to, "mac_speedup": row.mac_speedup,
             "comparisons": [{"target": c.target, "batch_size": c.batch_size, **c.to_dict()}
                             for c in row.comparisons], "failed": dict(row.failed)} for row in rows]}
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        console.print(f"Figures written to {args.json}")


if __name__ == "__main__":
    main()
