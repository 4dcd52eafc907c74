"""Benchmark suite: what a TPP training step costs over a plain one, eager and in the fast step mode, against a
reference-style TPP step; the prune phase's images/s through the pipeline's own loader and loop; peak GPU memory;
and what pruning buys at inference. A measurement script, not a test: it prints figures and asserts nothing.

    .venv/bin/python benchmarks/tpp_overhead.py [--device cpu|cuda] [--models resnet56 resnet50] [--steps N]
        [--warmup N] [--fast compile|graph|none] [--pipeline-steps N] [--json PATH]

Step section: per model (ResNet56, batch 128, 32×32, `*layer*.conv1` at 0.9; ResNet50, batch 64, 224×224, the
paper's 2.31× ratios) the plain, TPP and reference-style steps run through `build_step`, side by side in blocks
that alternate (reversed each round) so machine-load drift hits all alike; TPP is past its ramp (λ = τ) so every
term runs. Pipeline section: ResNet56 + TPP through `build_loaders` (a synthetic CIFAR-10 file set in the real
format) and `fit`, timed after warm-up. Inference section: the network physically pruned against the dense one.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from pipeline.config import DataConfig, PruneConfig, RegularizerConfig, TrainerConfig
from pipeline.data import build_loaders
from pipeline.measure.cost import count_macs, count_parameters
from pipeline.measure import latency
from pipeline.models import create_model
from pipeline.pruning.regularizer import LambdaSchedule, TPPRegularizer
from pipeline.pruning.selection import select_filters
from pipeline.pruning.surgery import remove_filters
from pipeline.runtime import Runtime, configure_numerics, resolve_device
from pipeline.training.loop import TrainingHooks, fit, sgd
from pipeline.training.step import build_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_tpp import ReferenceStyleTPP  # noqa: E402
from synthetic_cifar import write_cifar10  # noqa: E402

OVERHEAD_GOAL = 1.05
CIFAR_PATTERN = "*layer*.conv1"


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked network: its input shape, batch and the pruning pattern → ratio of its recipe."""

    name: str
    num_classes: int
    image_size: int
    batch_size: int
    ratios: Mapping[str, float]


MODELS = {
    "resnet56": ModelSpec("resnet56", 10, 32, 128, {CIFAR_PATTERN: 0.9}),
    "resnet50": ModelSpec("resnet50", 1000, 224, 64, {"*layer[1-3]*conv[1-2]": 0.6, "*layer4*conv[1-2]": 0.21}),
}


@dataclass(frozen=True)
class StepTimes:
    """Per-step seconds of one variant: median and quartiles show the noise the interleaving could not remove."""

    median: float
    q1: float
    q3: float
    samples: int


@dataclass(frozen=True)
class StepRow:
    model: str
    variant: str
    mode: str
    amp: str
    times: StepTimes
    final_loss: float
    peak_mib: Optional[float]


@dataclass(frozen=True)
class PipelineRow:
    variant: str
    loader: str
    mode: str
    amp: str
    images_per_second: float
    timed_steps: int


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
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["resnet56"])
    parser.add_argument("--batch-size", type=positive_int, help="override every model's batch size")
    parser.add_argument("--amp", choices=("auto", "fp32", "bf16"), default="auto",
                        help="the pipeline's steps (auto: bf16 + channels_last on CUDA, fp32 on CPU); "
                             "the reference-style step is always fp32")
    parser.add_argument("--fast", choices=("auto", "compile", "graph", "none"), default="auto",
                        help="the fast step mode timed beside eager (auto: graph on CUDA, compile on CPU)")
    parser.add_argument("--steps", type=positive_int, default=48, help="timed training steps per variant")
    parser.add_argument("--warmup", type=int, default=6, help="untimed steps per variant first (compile, capture)")
    parser.add_argument("--block", type=positive_int, default=4,
                        help="consecutive steps of one variant before switching")
    parser.add_argument("--pipeline-steps", type=int, default=60,
                        help="prune-phase steps through loader + fit per pipeline variant (0 skips the section)")
    parser.add_argument("--workers", default="auto", help="data.num_workers of the pipeline section's DataLoader")
    parser.add_argument("--ratio", type=float, nargs="*", default=[0.5, 0.9],
                        help=f"ResNet56 pruning ratios of {CIFAR_PATTERN} for the inference rows (none skips them)")
    parser.add_argument("--latency-repeats", type=positive_int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU, and this machine has none (leave --device out to run on CPU)")
    return args


def synchronize(device: torch.device) -> None:
    """CUDA runs asynchronously; without a sync the clock would measure only kernel launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolved(args: argparse.Namespace, device: torch.device) -> Tuple[str, str]:
    """The amp and fast step mode `auto` stands for on this device."""
    amp = args.amp if args.amp != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    fast = args.fast if args.fast != "auto" else ("graph" if device.type == "cuda" else "compile")
    return amp, fast


# --- step section -----------------------------------------------------------------------------------------------

@dataclass
class StepRun:
    """One variant: its own model copy, optimizer, hooks and step function, so variants share no state."""

    variant: str
    mode: str
    amp: str
    model: nn.Module
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def random_batch(spec: ModelSpec, batch_size: int, device: torch.device,
                 seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch of the model's input shape: timing needs realistic shapes, not real images."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch_size, 3, spec.image_size, spec.image_size, generator=generator)
    targets = torch.randint(0, spec.num_classes, (batch_size,), generator=generator)
    return inputs.to(device), targets.to(device)


def dense_model(spec: ModelSpec, device: torch.device, seed: int) -> nn.Module:
    """The seeded dense network every variant is copied from, so all start from identical weights."""
    torch.manual_seed(seed)
    return create_model(spec.name, spec.num_classes).to(device)


def hooks_for(variant: str, model: nn.Module, spec: ModelSpec, example: torch.Tensor) -> TrainingHooks:
    """No hooks (plain), the pipeline's TPP past its ramp, or the reference-style TPP at the same λ."""
    if variant == "plain":
        return TrainingHooks()
    pruned = select_filters(model, dict(spec.ratios), example_inputs=example)
    config = RegularizerConfig()
    if variant == "reference":
        return ReferenceStyleTPP(model, pruned, example, config, step=LambdaSchedule.from_config(config).update_steps)
    regularizer = TPPRegularizer(model, pruned, example, config)
    regularizer.iteration = regularizer.schedule.update_steps
    return regularizer


def step_run(variant: str, mode: str, amp: str, dense: nn.Module, spec: ModelSpec,
             example: torch.Tensor, device: torch.device) -> StepRun:
    """A variant built as `fit` builds its step: the regularized phase's SGD settings, channels_last on CUDA."""
    model = copy.deepcopy(dense).train()
    hooks = hooks_for(variant, model, spec, example)
    settings = PruneConfig()
    optimizer = sgd(model, settings.lr, settings.momentum, settings.weight_decay)
    channels_last = device.type == "cuda" and variant != "reference"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    runtime = Runtime(device, amp=amp, step=mode, channels_last=channels_last)
    step = build_step(model, optimizer, torch.amp.GradScaler(device.type, enabled=False), hooks, runtime)
    return StepRun(variant, mode, amp, model, step)


def timed_step(run: StepRun, batch: Tuple[torch.Tensor, torch.Tensor], device: torch.device) -> float:
    synchronize(device)
    started = time.perf_counter()
    run.step(*batch)
    synchronize(device)
    return time.perf_counter() - started


def interleaved_steps(runs: Sequence[StepRun], batch: Tuple[torch.Tensor, torch.Tensor], device: torch.device,
                      steps: int, warmup: int, block: int) -> List[List[float]]:
    """Alternate blocks of `block` steps per run, reversing the order each round, so drift affects all alike."""
    for run in runs:
        for _ in range(warmup):
            timed_step(run, batch, device)
    times: List[List[float]] = [[] for _ in runs]
    order = list(range(len(runs)))
    for _ in range((steps + block - 1) // block):
        for index in order:
            count = min(block, steps - len(times[index]))
            times[index].extend(timed_step(runs[index], batch, device) for _ in range(count))
        order.reverse()
    return times


def peak_step_mib(run: StepRun, batch: Tuple[torch.Tensor, torch.Tensor], device: torch.device) -> Optional[float]:
    """CUDA memory a step allocates above what is resident before it (weights, optimizer state), in MiB."""
    if device.type != "cuda":
        return None
    synchronize(device)
    resident = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run.step(*batch)
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - resident) / 2**20


def summarize(times: Sequence[float]) -> StepTimes:
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else (times[0],) * 3
    return StepTimes(median, q1, q3, len(times))


@torch.no_grad()
def final_loss(model: nn.Module, batch: Tuple[torch.Tensor, torch.Tensor]) -> float:
    """Training loss after the benchmark: a diverged (NaN/inf) model would make its timings meaningless."""
    inputs, targets = batch
    return nn.functional.cross_entropy(model(inputs).float(), targets).item()


def step_section(spec: ModelSpec, args: argparse.Namespace, device: torch.device) -> List[StepRow]:
    """Plain, TPP (eager and fast) and reference-style steps of one model, interleaved in one run."""
    amp, fast = resolved(args, device)
    batch = random_batch(spec, args.batch_size or spec.batch_size, device, args.seed)
    example = batch[0][:1]
    dense = dense_model(spec, device, args.seed)
    plan = [("plain", "eager", amp), ("tpp", "eager", amp), ("reference", "eager", "fp32")]
    if fast != "none":
        plan += [("plain", fast, amp), ("tpp", fast, amp)]
    runs = [step_run(variant, mode, variant_amp, dense, spec, example, device) for variant, mode, variant_amp in plan]
    times = interleaved_steps(runs, batch, device, args.steps, args.warmup, args.block)
    return [StepRow(spec.name, run.variant, run.mode, run.amp, summarize(run_times), final_loss(run.model, batch),
                    peak_step_mib(run, batch, device)) for run, run_times in zip(runs, times)]


# --- pipeline section -------------------------------------------------------------------------------------------

class _TimedHooks(TrainingHooks):
    """The benchmarked hooks, plus a clock from the end of step `warmup` (compile, capture, worker start-up done)
    to the end of step `last` (before the epoch's evaluation)."""

    def __init__(self, inner: TrainingHooks, warmup: int, last: int, device: torch.device) -> None:
        self.inner, self.warmup, self.last, self.device = inner, warmup, last, device
        self.steps = 0
        self.started: Optional[float] = None
        self.stopped: Optional[float] = None

    def extra_loss(self) -> Optional[torch.Tensor]:
        return self.inner.extra_loss()

    def before_optimizer_step(self) -> None:
        self.inner.before_optimizer_step()

    def after_optimizer_step(self) -> None:
        self.inner.after_optimizer_step()
        self.steps += 1
        if self.steps in (self.warmup, self.last):
            synchronize(self.device)
            if self.steps == self.warmup:
                self.started = time.perf_counter()
            else:
                self.stopped = time.perf_counter()


def pipeline_plan(device: torch.device, amp: str, fast: str) -> List[Tuple[str, str, str, str]]:
    """(variant, data.loader, trainer.step, amp) rows: the pipeline's fast path on both loaders (a captured step
    fed by pinning DataLoader workers is the ImageNet path), its eager path, the reference."""
    fast_mode = "graph" if device.type == "cuda" and fast == "graph" else "eager"
    fast_rows = [("tpp", "device", fast_mode, amp)] + ([("tpp", "workers", fast_mode, amp)] if fast_mode != "eager"
                                                       else [])
    return fast_rows + [("tpp", "workers", "eager", amp), ("reference", "workers", "eager", "fp32")]


def pipeline_row(root: Path, variant: str, loader: str, mode: str, amp: str, args: argparse.Namespace,
                 device: torch.device) -> PipelineRow:
    """ResNet56 in its prune phase for `--pipeline-steps` steps through `build_loaders` and `fit`."""
    spec = MODELS["resnet56"]
    batch_size = args.batch_size or spec.batch_size
    data = DataConfig(name="cifar10", root=str(root), eval_batch_size=256, num_workers=args.workers, loader=loader)
    train, test, _ = build_loaders(data, batch_size=batch_size, seed=args.seed, device=device)
    model = dense_model(spec, device, args.seed).train()
    example = torch.zeros(1, 3, 32, 32, device=device)
    warmup = max(args.warmup, 1)
    hooks = _TimedHooks(hooks_for(variant, model, spec, example), warmup, args.pipeline_steps, device)
    settings = PruneConfig()
    optimizer = sgd(model, settings.lr, settings.momentum, settings.weight_decay)
    channels_last = device.type == "cuda" and variant != "reference"
    runtime = Runtime(device, amp=amp, step=mode, channels_last=channels_last)
    fit(model, train, test, optimizer, runtime=runtime, max_steps=args.pipeline_steps, hooks=hooks, stage="bench")
    elapsed = hooks.stopped - hooks.started
    timed = args.pipeline_steps - warmup
    return PipelineRow(variant, loader, mode, amp, timed * batch_size / elapsed, timed)


def pipeline_section(args: argparse.Namespace, device: torch.device) -> List[PipelineRow]:
    """All pipeline variants on one synthetic CIFAR-10 file set, a few batches more than the steps run."""
    amp, fast = resolved(args, device)
    batch_size = args.batch_size or MODELS["resnet56"].batch_size
    with tempfile.TemporaryDirectory(prefix="tpp-bench-") as folder:
        root = write_cifar10(Path(folder), train_images=batch_size * (args.pipeline_steps + 2), test_images=256)
        return [pipeline_row(root, *row, args, device) for row in pipeline_plan(device, amp, fast)]


# --- inference section ------------------------------------------------------------------------------------------

def pruned_copy(dense: nn.Module, ratio: float, example: torch.Tensor) -> nn.Module:
    """The dense network with `ratio` of every block's inner-conv filters physically removed."""
    model = copy.deepcopy(dense)
    return remove_filters(model, select_filters(model, {CIFAR_PATTERN: ratio}), example)


def latency_pair(dense: nn.Module, pruned: nn.Module, batch: torch.Tensor, repeats: int) -> Tuple[float, float]:
    """Median seconds per eager fp32 forward of `batch`, dense and pruned as given (no folding), interleaved."""
    dense_times, pruned_times = latency.interleaved_times(
        latency.torch_forward(dense.eval(), batch, "fp32"), latency.torch_forward(pruned.eval(), batch, "fp32"),
        repeats, lambda: synchronize(batch.device))
    return statistics.median(dense_times), statistics.median(pruned_times)


def inference_rows(args: argparse.Namespace, device: torch.device) -> List[InferenceRow]:
    spec = MODELS["resnet56"]
    batch = random_batch(spec, args.batch_size or spec.batch_size, device, args.seed)[0]
    example = batch[:1]
    dense = dense_model(spec, device, args.seed).eval()
    rows = []
    for ratio in args.ratio:
        pruned = pruned_copy(dense, ratio, example)
        dense_latency, pruned_latency = latency_pair(dense, pruned, batch, args.latency_repeats)
        rows.append(InferenceRow(ratio, dense_latency, pruned_latency, count_macs(dense, example),
                                 count_macs(pruned, example), count_parameters(dense), count_parameters(pruned)))
    return rows


# --- report -----------------------------------------------------------------------------------------------------

def environment(device: torch.device) -> Dict[str, object]:
    """What the figures depend on: the evaluate stage's record of device, CPU, threads and versions, plus the
    command and the numerics flags of this benchmark."""
    return {"command": shlex.join([Path(sys.executable).name, *sys.argv]), **latency.environment(device),
            "torch_pruning": metadata.version("torch-pruning"), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark}


def environment_table(env: Mapping[str, object]) -> Table:
    table = Table(title="Environment", show_header=False)
    table.add_column("key")
    table.add_column("value")
    for key, value in env.items():
        table.add_row(key, str(value))
    return table


def ratio_lines(rows: Sequence[StepRow]) -> List[str]:
    """TPP ÷ plain per mode (the ≤ 1.05 goal) and the pipeline's TPP ÷ the reference-style step."""
    median = {(row.variant, row.mode): row.times.median for row in rows}
    lines = []
    for mode in dict.fromkeys(row.mode for row in rows):
        if ("tpp", mode) in median and ("plain", mode) in median:
            value = median[("tpp", mode)] / median[("plain", mode)]
            verdict = "meets" if value <= OVERHEAD_GOAL else "misses"
            lines.append(f"TPP ÷ plain ({mode}) = {value:.3f} ({verdict} the ≤ {OVERHEAD_GOAL} goal)")
    for mode in dict.fromkeys(row.mode for row in rows if row.variant == "tpp"):
        lines.append(f"reference-style ÷ TPP ({mode}) = {median[('reference', 'eager')] / median[('tpp', mode)]:.2f}×")
    return lines


def step_table(rows: Sequence[StepRow]) -> Table:
    spec = MODELS[rows[0].model]
    table = Table(title=f"{spec.name} training step, TPP on {dict(spec.ratios)}, λ at max")
    for column in ("variant", "mode", "amp", "median ms/step", "IQR ms/step", "steps", "final loss", "peak MiB"):
        table.add_column(column, justify="left" if column in ("variant", "mode", "amp") else "right")
    for row in rows:
        table.add_row(row.variant, row.mode, row.amp, f"{1e3 * row.times.median:.1f}",
                      f"{1e3 * row.times.q1:.1f}–{1e3 * row.times.q3:.1f}", str(row.times.samples),
                      f"{row.final_loss:.4f}", "n/a" if row.peak_mib is None else f"{row.peak_mib:.0f}")
    table.caption = "\n".join(ratio_lines(rows))
    return table


def pipeline_table(rows: Sequence[PipelineRow], batch_size: int) -> Table:
    table = Table(title=f"resnet56 prune phase through build_loaders + fit (synthetic CIFAR-10 files, b{batch_size})")
    for column in ("variant", "data.loader", "trainer.step", "amp", "images/s", "timed steps"):
        table.add_column(column, justify="right" if column in ("images/s", "timed steps") else "left")
    for row in rows:
        table.add_row(row.variant, row.loader, row.mode, row.amp, f"{row.images_per_second:,.0f}",
                      str(row.timed_steps))
    reference = next(row for row in rows if row.variant == "reference")
    table.caption = "; ".join(f"{row.loader}+{row.mode} ÷ reference = "
                              f"{row.images_per_second / reference.images_per_second:.2f}×"
                              for row in rows if row.variant == "tpp")
    return table


def inference_table(rows: Sequence[InferenceRow], batch_size: int) -> Table:
    table = Table(title=f"resnet56 inference (eval, batch {batch_size}): pruned vs dense")
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
    configure_numerics(TrainerConfig(), device)
    console = Console()
    env = environment(device)
    console.print(environment_table(env))
    figures: Dict[str, object] = {"environment": env, "settings": {key: str(value) for key, value in vars(args).items()}}

    steps = {}
    for name in args.models:
        rows = step_section(MODELS[name], args, device)
        console.print(step_table(rows))
        steps[name] = [asdict(row) for row in rows] + [{"ratios": ratio_lines(rows)}]
    figures["steps"] = steps

    if args.pipeline_steps > max(args.warmup, 1):
        rows = pipeline_section(args, device)
        console.print(pipeline_table(rows, args.batch_size or MODELS["resnet56"].batch_size))
        figures["pipeline"] = [asdict(row) for row in rows]

    if args.ratio:
        rows = inference_rows(args, device)
        console.print(inference_table(rows, args.batch_size or MODELS["resnet56"].batch_size))
        figures["inference"] = [asdict(row) | {"latency_ratio": row.pruned_latency / row.dense_latency,
                                               "mac_ratio": row.pruned_macs / row.dense_macs} for row in rows]

    console.print(f"Reproduce with: {env['command']}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        console.print(f"Figures written to {args.json}")


if __name__ == "__main__":
    main()
