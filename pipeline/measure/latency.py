"""Dense versus pruned latency where the network runs: eager PyTorch on the evaluation device, ONNX Runtime on the
CPU and, with CUDA, the forward replayed as one CUDA graph and the forward compiled by `torch.compile`; at batch 1
and a throughput batch.

Both networks are measured in their deployment form (eval mode, BatchNorm folded), interleaved round by round in
alternating order so load drifts on a shared machine hit both alike, after warm-up calls that are not timed
(compilation, allocator and cache warm-up). Each side reports its median and inter-quartile range (IQR); the
speed-up is the median of the per-round ratios, with their IQR, so its spread is paired like the rounds.
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

from pipeline.config import LATENCY_TARGETS
from pipeline.cuda_graphs import warmed_up_capture
from pipeline.measure.export import export_onnx, fold_batchnorm, onnx_session, run_onnx
from pipeline.runtime import autocast

Forward = Callable[[], object]
WARMUP_CALLS = 3
TARGETS = LATENCY_TARGETS


@dataclass(frozen=True)
class LatencyComparison:
    """One target at one batch size: milliseconds per forward pass, median and IQR, and the speed-up."""

    target: str
    batch_size: int
    dense_ms: float
    dense_iqr_ms: float
    pruned_ms: float
    pruned_iqr_ms: float
    speedup: float
    speedup_iqr: float

    def to_dict(self) -> Dict[str, float]:
        return {key: value for key, value in asdict(self).items() if key not in ("target", "batch_size")}


def interquartile_range(values: Sequence[float]) -> float:
    """Q3 − Q1 (0 for fewer than two values): a spread robust to the odd preempted call."""
    if len(values) < 2:
        return 0.0
    first, _, third = statistics.quantiles(values, n=4, method="inclusive")
    return third - first


def interleaved_times(dense: Forward, pruned: Forward, repeats: int, synchronize: Callable[[], None],
                      warmup: int = WARMUP_CALLS) -> Tuple[List[float], List[float]]:
    """Seconds per call of each forward, `repeats` rounds after `warmup` untimed calls each; the order within a
    round alternates so neither side always runs right after the other."""
    for _ in range(warmup):
        dense()
        pruned()
    synchronize()
    times: Dict[int, List[float]] = {0: [], 1: []}
    for round_index in range(repeats):
        order = (0, 1) if round_index % 2 == 0 else (1, 0)
        for side in order:
            call = dense if side == 0 else pruned
            started = time.perf_counter()
            call()
            synchronize()
            times[side].append(time.perf_counter() - started)
    return times[0], times[1]


def compare(target: str, batch_size: int, dense: Forward, pruned: Forward, repeats: int,
            synchronize: Callable[[], None]) -> LatencyComparison:
    """Time both forwards interleaved and summarise them as a `LatencyComparison`."""
    dense_times, pruned_times = interleaved_times(dense, pruned, repeats, synchronize)
    ratios = [d / p for d, p in zip(dense_times, pruned_times)]
    return LatencyComparison(target, batch_size, 1e3 * statistics.median(dense_times),
                             1e3 * interquartile_range(dense_times), 1e3 * statistics.median(pruned_times),
                             1e3 * interquartile_range(pruned_times), statistics.median(ratios),
                             interquartile_range(ratios))


def torch_forward(model: nn.Module, batch: torch.Tensor, amp: str) -> Forward:
    """One no-grad forward of `batch` under the run's mixed precision."""

    def forward() -> object:
        with torch.inference_mode(), autocast(batch.device, amp):
            return model(batch)

    return forward


def onnx_forward(path: Path, batch: np.ndarray) -> Forward:
    """One ONNX Runtime CPU call on `batch`."""
    session = onnx_session(path)
    return lambda: run_onnx(session, batch)


def graphed_forward(model: nn.Module, batch: torch.Tensor, amp: str) -> Forward:
    """The forward captured once as a CUDA graph and replayed: the network's kernels without a launch per layer,
    as a deployment runtime that plans the whole network runs them (warm-up and capture: `pipeline.cuda_graphs`)."""
    forward = torch_forward(model, batch.clone(), amp)
    graph, static_output = warmed_up_capture(forward, batch.device, WARMUP_CALLS)

    def replay() -> object:
        graph.replay()
        return static_output

    return replay


def compiled_forward(model: nn.Module, batch: torch.Tensor, amp: str) -> Forward:
    """The forward compiled by `torch.compile` for this batch's shape (Triton kernels on CUDA)."""
    return torch_forward(torch.compile(model, dynamic=False), batch, amp)


FORWARDS: Dict[str, Callable[[nn.Module, torch.Tensor, str], Forward]] = {
    "eager": torch_forward, "graph": graphed_forward, "compile": compiled_forward}


@dataclass
class LatencyResults:
    """What `measure_targets` measured, and each target that failed with its error (the others were still timed)."""

    comparisons: List[LatencyComparison] = field(default_factory=list)
    failed: Dict[str, str] = field(default_factory=dict)


def available_targets(device: torch.device) -> Tuple[str, ...]:
    """The deployment targets this machine can time: eager on `device` and ONNX Runtime on the CPU everywhere;
    with CUDA also the forward replayed as a CUDA graph and the forward compiled by `torch.compile`."""
    return TARGETS if device.type == "cuda" else TARGETS[:2]


def split_targets(requested: Sequence[str], device: torch.device) -> Tuple[Tuple[str, ...], Dict[str, str]]:
    """The requested targets this device can time, and the others with the reason they are not timed here."""
    available = available_targets(device)
    return (tuple(target for target in available if target in requested),
            {target: f"needs CUDA; the evaluation ran on {device.type}"
             for target in requested if target not in available})


def target_name(target: str, device: torch.device) -> str:
    """A target as reported: `<target>_<where it runs>`, e.g. `eager_cuda`, `onnxruntime_cpu`."""
    return "onnxruntime_cpu" if target == "onnxruntime" else f"{target}_{device.type}"


def measure_targets(dense: nn.Module, pruned: nn.Module, example: torch.Tensor, device: torch.device, amp: str,
                    batch_sizes: Sequence[int], repeats: int, channels_last: bool = False,
                    pruned_onnx: Optional[Path] = None,
                    targets: Optional[Sequence[str]] = None) -> LatencyResults:
    """Dense vs pruned at every batch size on each of `targets` (default: all `available_targets`); both
    BN-folded. A target is reported as `target_name`.

    A target that fails (a capture error, `torch.compile` without a C compiler for Triton) is recorded with its
    error, with a warning, and left out at every batch size; the other targets are still timed.
    `pruned_onnx` reuses an already exported (folded) pruned network; the dense one is exported to a temporary file.
    """
    targets = _checked_targets(targets, device)
    memory_format = torch.channels_last if channels_last and example.dim() == 4 else torch.contiguous_format
    folded = {name: fold_batchnorm(model).to(device, memory_format=memory_format)
              for name, model in (("dense", dense), ("pruned", pruned))}
    synchronize = _synchronizer(device)
    results = LatencyResults()
    onnx_files: Dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as folder:
        for batch_size in batch_sizes:
            batch = _batch(example, batch_size).to(device, memory_format=memory_format)
            host = _batch(example, batch_size).cpu().float().numpy()
            for target in targets:
                name = target_name(target, device)
                if name in results.failed:
                    continue
                try:
                    if target == "onnxruntime":
                        onnx_files = onnx_files or _exported(folded, example, Path(folder), pruned_onnx)
                        forwards = [onnx_forward(onnx_files[side], host) for side in ("dense", "pruned")]
                        results.comparisons.append(compare(name, batch_size, *forwards, repeats, lambda: None))
                    else:
                        forwards = [FORWARDS[target](folded[side], batch, amp) for side in ("dense", "pruned")]
                        results.comparisons.append(compare(name, batch_size, *forwards, repeats, synchronize))
                except Exception as error:
                    results.failed[name] = f"{type(error).__name__}: {_first_line(error)}"
                    results.comparisons = [row for row in results.comparisons if row.target != name]
                    warnings.warn(f"The {name} latency target failed and is left out of the comparison "
                                  f"({results.failed[name]}); the other targets are still timed. Leave it out of "
                                  f"evaluate.targets if it cannot work on this machine.", RuntimeWarning,
                                  stacklevel=2)
    return results


def _exported(folded: Dict[str, nn.Module], example: torch.Tensor, folder: Path,
              pruned_onnx: Optional[Path]) -> Dict[str, Path]:
    """ONNX files of both folded networks, reusing `pruned_onnx` when given."""
    return {"dense": export_onnx(folded["dense"], example, folder / "dense.onnx"),
            "pruned": pruned_onnx or export_onnx(folded["pruned"], example, folder / "pruned.onnx")}


def _checked_targets(targets: Optional[Sequence[str]], device: torch.device) -> Tuple[str, ...]:
    """The requested targets in their canonical order, refusing names that do not exist or need CUDA."""
    available = available_targets(device)
    if targets is None:
        return available
    unknown = [target for target in targets if target not in available]
    if unknown:
        raise ValueError(f"latency targets {unknown} are not available on {device.type}; "
                         f"this machine can time {list(available)} (graph and compile need CUDA)")
    return tuple(target for target in available if target in targets)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def environment(device: torch.device) -> Dict[str, object]:
    """What the figures were measured on and with: device, CPU, threads and library versions."""
    return {"device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "cpu": cpu_name(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "cuda": torch.version.cuda if device.type == "cuda" else None}


def _batch(example: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A batch of `batch_size` copies of a random-valued sample (zeros could hit special fast paths)."""
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, *example.shape[1:], generator=generator)
    return sample.expand(batch_size, *example.shape[1:]).contiguous()


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo on Linux), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
