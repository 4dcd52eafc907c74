"""Benchmark: what a TPP training step costs over a plain one, and what pruning buys at inference.

A measurement script, not a test: it prints figures and asserts nothing about speed. Run from the repository root:

    .venv/bin/python benchmarks/tpp_overhead.py [--device cpu|cuda] [--batch-size 128] [--steps N] [--warmup N]
                                                [--ratio 0.5 0.9] [--json PATH]

Training: ResNet56 (CIFAR, 10 classes) on one fixed random batch, SGD with momentum, timed per step; the plain and the
TPP copy start from the same weights and alternate in blocks so machine-load drift hits both alike. Inference: eval
latency of the network physically pruned at `*layer*.conv1` against the dense one, beside the MAC and parameter ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from pipeline.config import PruneConfig, RegularizerConfig
from pipeline.measure.cost import count_macs, count_parameters, latency_pair
from pipeline.models import create_model
from pipeline.runtime import resolve_device
from pipeline.pruning.surgery import remove_filters
from pipeline.pruning.selection import select_filters
from pipeline.pruning.regularizer import TPPRegularizer
from pipeline.training.loop import TrainingHooks, sgd, train_step

MODEL = "resnet56"
NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)
LAYER_PATTERN = "*layer*.conv1"
OVERHEAD_GOAL = 1.05


@dataclass
class TrainingRun:
    """One model with its own optimizer and hooks, so the two variants share no optimizer state."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    hooks: TrainingHooks
    scaler: torch.amp.GradScaler


@dataclass(frozen=True)
class StepTimes:
    """Per-step seconds of one variant: median and quartiles show the noise the interleaving could not remove."""

    median: float
    q1: float
    q3: float
    samples: int


@dataclass(frozen=True)
class InferenceRow:
    """Dense versus pruned at one ratio: latency measured interleaved, MACs per image, parameters."""

    ratio: float
    dense_latency: float
    pruned_latency: float
    dense_macs: int
    pruned_macs: int
    dense_params: int
    pruned_params: int


def positive_int(text: str) -> int:
    """argparse type: a count below 1 would leave nothing to time (and an empty median)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--steps", type=positive_int, default=48, help="timed training steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps per variant first")
    parser.add_argument("--block", type=positive_int, default=4,
                        help="consecutive steps of one variant before switching")
    parser.add_argument("--ratio", type=float, nargs="+", default=[0.5, 0.9],
                        help=f"pruning ratios of {LAYER_PATTERN} for the inference rows; the TPP step uses the "
                             f"largest (its cost does not depend on the ratio: masks are dense)")
    parser.add_argument("--latency-repeats", type=positive_int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    return parser.parse_args()


def synchronize(device: torch.device) -> None:
    """CUDA runs asynchronously; without a sync the clock would measure only kernel launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batch(batch_size: int, device: torch.device, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A fixed random CIFAR-shaped batch: timing needs realistic shapes, not real images."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch_size, *IMAGE_SHAPE, generator=generator)
    targets = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator)
    return inputs.to(device), targets.to(device)


def dense_model(device: torch.device, seed: int) -> nn.Module:
    """The seeded dense ResNet56 every variant is copied from, so all start from identical weights."""
    torch.manual_seed(seed)
    return create_model(MODEL, NUM_CLASSES).to(device)


def training_run(model: nn.Module, hooks: TrainingHooks, device: torch.device) -> TrainingRun:
    """SGD with the regularized phase's settings (PruneConfig defaults) and a disabled scaler, as `fit` builds."""
    settings = PruneConfig()
    optimizer = sgd(model, settings.lr, settings.momentum, settings.weight_decay)
    return TrainingRun(model.train(), optimizer, hooks, torch.amp.GradScaler(device.type, enabled=False))


def tpp_at_max_lambda(model: nn.Module, ratio: float, example: torch.Tensor) -> TPPRegularizer:
    """A TPP regularizer past its ramp, so the Gram term and the L2/BatchNorm gradient edits all run every step."""
    pruned = select_filters(model, {LAYER_PATTERN: ratio})
    regularizer = TPPRegularizer(model, pruned, example, RegularizerConfig())
    regularizer.step = regularizer.schedule.update_steps
    return regularizer


def timed_step(run: TrainingRun, inputs: torch.Tensor, targets: torch.Tensor, device: torch.device) -> float:
    """Seconds of one `train_step`, the exact step `fit` runs (forward, loss, backward, hooks, optimizer)."""
    synchronize(device)
    started = time.perf_counter()
    train_step(run.model, inputs, targets, run.optimizer, run.scaler, run.hooks, device, "fp32")
    synchronize(device)
    return time.perf_counter() - started


def interleaved_steps(runs: Mapping[str, TrainingRun], batch: Tuple[torch.Tensor, torch.Tensor],
                      device: torch.device, steps: int, warmup: int, block: int) -> Dict[str, List[float]]:
    """Alternate blocks of `block` steps per run, reversing the order each round, so drift affects all alike."""
    for run in runs.values():
        for _ in range(warmup):
            timed_step(run, *batch, device)
    times: Dict[str, List[float]] = {name: [] for name in runs}
    order = list(runs)
    for _ in range((steps + block - 1) // block):
        for name in order:
            count = min(block, steps - len(times[name]))
            times[name].extend(timed_step(runs[name], *batch, device) for _ in range(count))
        order.reverse()
    return times


def paired_ratio(plain: Sequence[float], tpp: Sequence[float], block: int) -> float:
    """Median over rounds of TPP's block median ÷ the adjacent plain block median: cancels slower load drift."""
    blocks = range(0, len(plain), block)
    return statistics.median(statistics.median(tpp[start:start + block]) / statistics.median(plain[start:start + block])
                             for start in blocks)


def summarize(times: Sequence[float]) -> StepTimes:
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else (times[0],) * 3
    return StepTimes(median, q1, q3, len(times))


@torch.no_grad()
def final_loss(run: TrainingRun, batch: Tuple[torch.Tensor, torch.Tensor]) -> float:
    """Training loss after the benchmark: a diverged (NaN/inf) model would make its timings meaningless."""
    inputs, targets = batch
    return nn.functional.cross_entropy(run.model(inputs), targets).item()


def pruned_copy(dense: nn.Module, ratio: float, example: torch.Tensor) -> nn.Module:
    """The dense network with `ratio` of every block's inner-conv filters physically removed."""
    model = copy.deepcopy(dense)
    return remove_filters(model, select_filters(model, {LAYER_PATTERN: ratio}), example)


def inference_row(dense: nn.Module, ratio: float, batch: torch.Tensor, example: torch.Tensor,
                  repeats: int) -> InferenceRow:
    pruned = pruned_copy(dense, ratio, example)
    dense_latency, pruned_latency = latency_pair(dense, pruned, batch, repeats)
    return InferenceRow(ratio, dense_latency, pruned_latency, count_macs(dense, example), count_macs(pruned, example),
                        count_parameters(dense), count_parameters(pruned))


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else the architecture: `platform.processor()` is often empty."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return models[0] if models else platform.machine()


def environment(device: torch.device) -> Dict[str, object]:
    """What the figures depend on: versions, hardware and the thread count CPU kernels use."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {"torch": torch.__version__, "torch_pruning": metadata.version("torch-pruning"),
            "python": platform.python_version(),
            "device": f"{device} ({name})", "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}


def environment_table(env: Dict[str, object]) -> Table:
    table = Table(title="Environment", show_header=False)
    table.add_column("key")
    table.add_column("value")
    for key, value in env.items():
        table.add_row(key, str(value))
    return table


def training_table(plain: StepTimes, tpp: StepTimes, paired: float, ratio: float,
                   losses: Tuple[float, float]) -> Table:
    table = Table(title=f"{MODEL} training step, TPP on {LAYER_PATTERN} @ {ratio:g}, λ at max")
    for column in ("variant", "median s/step", "IQR s/step", "steps", "final loss"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name, times, loss in (("plain", plain, losses[0]), ("TPP", tpp, losses[1])):
        table.add_row(name, f"{times.median:.4f}", f"{times.q1:.4f}–{times.q3:.4f}", str(times.samples),
                      f"{loss:.4f}")
    verdict = "meets" if tpp.median / plain.median <= OVERHEAD_GOAL else "misses"
    table.caption = (f"TPP / plain = {tpp.median / plain.median:.3f} ({verdict} the ≤ {OVERHEAD_GOAL} goal)\n"
                     f"paired by round: {paired:.3f}")
    return table


def inference_table(rows: Sequence[InferenceRow], batch_size: int) -> Table:
    table = Table(title=f"Inference (eval, batch {batch_size}): pruned vs dense")
    for column in ("ratio", "dense ms", "pruned ms", "latency ×", "MACs ×", "params dense→pruned"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(f"{row.ratio:g}", f"{1e3 * row.dense_latency:.1f}", f"{1e3 * row.pruned_latency:.1f}",
                      f"{row.pruned_latency / row.dense_latency:.3f}", f"{row.pruned_macs / row.dense_macs:.3f}",
                      f"{row.dense_params:,}→{row.pruned_params:,}")
    table.caption = "× = pruned ÷ dense (lower is better)"
    return table


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    console = Console()
    env = environment(device)
    console.print(environment_table(env))

    batch = random_batch(args.batch_size, device, args.seed)
    example = batch[0][:1]
    dense = dense_model(device, args.seed)
    tpp_ratio = max(args.ratio)
    plain_run = training_run(copy.deepcopy(dense), TrainingHooks(), device)
    tpp_model = copy.deepcopy(dense)
    tpp_run = training_run(tpp_model, tpp_at_max_lambda(tpp_model, tpp_ratio, example), device)
    times = interleaved_steps({"plain": plain_run, "tpp": tpp_run}, batch, device, args.steps, args.warmup,
                              args.block)
    plain, tpp = summarize(times["plain"]), summarize(times["tpp"])
    paired = paired_ratio(times["plain"], times["tpp"], args.block)
    losses = (final_loss(plain_run, batch), final_loss(tpp_run, batch))
    console.print(training_table(plain, tpp, paired, tpp_ratio, losses))

    rows = [inference_row(dense, ratio, batch[0], example, args.latency_repeats) for ratio in args.ratio]
    console.print(inference_table(rows, args.batch_size))

    if args.json:
        figures = {"environment": env, "settings": vars(args) | {"json": str(args.json)},
                   "training": {"ratio": tpp_ratio, "plain": asdict(plain), "tpp": asdict(tpp),
                                "tpp_over_plain": tpp.median / plain.median, "paired_ratio": paired,
                                "final_loss": {"plain": losses[0], "tpp": losses[1]}},
                   "inference": [asdict(row) | {"latency_ratio": row.pruned_latency / row.dense_latency,
                                                "mac_ratio": row.pruned_macs / row.dense_macs} for row in rows]}
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        console.print(f"Figures written to {args.json}")


if __name__ == "__main__":
    main()
