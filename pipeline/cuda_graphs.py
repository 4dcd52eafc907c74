"""CUDA-graph warm-up and capture, shared by the captured training step and the replayed-forward latency target.

A capture wants its warm-up on a side stream (cuDNN picks its algorithms, cuBLAS creates its handles, the
allocator settles, an optimizer creates its state) and then records on static tensors. Two details hold for every
capture here: autocast's weight-cast cache is switched off inside it (cached casts must not outlive the capture),
and the capture is thread-local, so a DataLoader's pin-memory thread allocating pinned buffers meanwhile (a CUDA
call from another thread) neither invalidates it nor ends up in it.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple, TypeVar

import torch

Result = TypeVar("Result")


def on_side_stream(work: Callable[[], Result], device: torch.device,
                   stream: Optional[torch.cuda.Stream] = None) -> Result:
    """Run `work` eagerly on a side stream (a new one unless given), ordered after and before the current one."""
    current = torch.cuda.current_stream(device)
    side = stream if stream is not None else torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        result = work()
    current.wait_stream(side)
    return result


def capture(work: Callable[[], Result]) -> Tuple[torch.cuda.CUDAGraph, Result]:
    """Record `work` (already warmed up) as one CUDA graph; its result is the static output a replay refreshes."""
    graph = torch.cuda.CUDAGraph()
    with torch.autocast(device_type="cuda", enabled=False, cache_enabled=False), \
            torch.cuda.graph(graph, capture_error_mode="thread_local"):
        result = work()
    return graph, result


def warmed_up_capture(work: Callable[[], Result], device: torch.device, warmup: int) -> Tuple[torch.cuda.CUDAGraph,
                                                                                               Result]:
    """`warmup` eager calls of `work` on a side stream, then its capture."""
    on_side_stream(lambda: [work() for _ in range(warmup)], device)
    return capture(work)
