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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

from pipeline.measure.export import export_onnx, fold_batchnorm, onnx_session, run_onnx
from pipeline.runtime import autocast

Forward = Callable[[], object]
WARMUP_CALLS = 3
TARGETS = ("eager", "onnxruntime", "graph", "compile")


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
    as a deployment runtime that plans the whole network runs them.

    Warm-up calls run on a side stream first (cuDNN picks its algorithms, the allocator settles), as captures
    want; autocast's weight-cast cache is off inside the capture, whose casts must not outlive it.
    """
    static_batch = batch.clone()
    forward = torch_forward(model, static_batch, amp)
    current, side = torch.cuda.current_stream(batch.device), torch.cuda.Stream(batch.device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(WARMUP_CALLS):
            forward()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.autocast(device_type="cuda", enabled=False, cache_enabled=False), \
            torch.cuda.graph(graph, capture_error_mode="thread_local"):
        static_output = forward()

    def replay() -> object:
        graph.replay()
        return static_output

    return replay


def available_targets(device: torch.device) -> Tuple[str, ...]:
    """The deployment targets this machine can time: eager on `device` and ONNX Runtime on the CPU everywhere;
    with CUDA also the forward replayed as a CUDA graph and the forward compiled by `torch.compile`."""
    return TARGETS if device.type == "cuda" else TARGETS[:2]


def measure_targets(dense: nn.Module, pruned: nn.Module, example: torch.Tensor, device: torch.device, amp: str,
                    batch_sizes: Sequence[int], repeats: int, channels_last: bool = False,
                    pruned_onnx: Optional[Path] = None,
                    targets: Optional[Sequence[str]] = None) -> List[LatencyComparison]:
    """Dense vs pruned at every batch size on each of `targets` (default: all `available_targets`); both
    BN-folded. A target is reported as `<target>_<where it runs>`, e.g. `eager_cuda`, `onnxruntime_cpu`.

    `pruned_onnx` reuses an already exported (folded) pruned network; the dense one is exported to a temporary file.
    """
    targets = _checked_targets(targets, device)
    memory_format = torch.channels_last if channels_last and example.dim() == 4 else torch.contiguous_format
    folded = {name: fold_batchnorm(model).to(device, memory_format=memory_format)
              for name, model in (("dense", dense), ("pruned", pruned))}
    synchronize = _synchronizer(device)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        if "onnxruntime" in targets:
            onnx_files = {"dense": export_onnx(folded["dense"], example, Path(folder) / "dense.onnx"),
                          "pruned": pruned_onnx or export_onnx(folded["pruned"], example,
                                                               Path(folder) / "pruned.onnx")}
        for batch_size in batch_sizes:
            batch = _batch(example, batch_size).to(device, memory_format=memory_format)
            host = _batch(example, batch_size).cpu().float().numpy()
            for target in targets:
                if target == "onnxruntime":
                    forwards = [onnx_forward(onnx_files[side], host) for side in ("dense", "pruned")]
                    results.append(compare("onnxruntime_cpu", batch_size, *forwards, repeats, lambda: None))
                    continue
                if target == "eager":
                    forwards = [torch_forward(folded[side], batch, amp) for side in ("dense", "pruned")]
                elif target == "graph":
                    forwards = [graphed_forward(folded[side], batch, amp) for side in ("dense", "pruned")]
                else:
                    forwards = [torch_forward(torch.compile(folded[side], dynamic=False), batch, amp)
                                for side in ("dense", "pruned")]
                results.append(compare(f"{target}_{device.type}", batch_size, *forwards, repeats, synchronize))
    return results


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


def latency_pair(dense: nn.Module, pruned: nn.Module, batch: torch.Tensor, repeats: int) -> Tuple[float, float]:
    """Median seconds per eager fp32 forward of `batch`, dense and pruned as given (no folding), interleaved."""
    dense_times, pruned_times = interleaved_times(torch_forward(dense.eval(), batch, "fp32"),
                                                  torch_forward(pruned.eval(), batch, "fp32"), repeats,
                                                  _synchronizer(batch.device))
    return statistics.median(dense_times), statistics.median(pruned_times)


def environment(device: torch.device) -> Dict[str, object]:
    """What the figures were measured on and with: device, CPU, threads and library versions."""
    return {"device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
            "cpu": _cpu_name(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
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


def _cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo on Linux), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
