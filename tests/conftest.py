"""Fixtures shared by test modules, and each test process's share of the CPU cores."""

from __future__ import annotations

import os
from typing import Iterator

import pytest
import torch


def cores_per_worker() -> int:
    """The cores this machine gives pytest, divided among the pytest-xdist workers (1 without xdist): each worker
    letting torch use every core would oversubscribe them and make the suite slower, not faster."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


def pytest_configure(config: pytest.Config) -> None:
    """In each process that runs tests: torch's threads, and OMP_NUM_THREADS for the subprocesses tests start (dvc
    repro, stages, torchrun), unless the caller chose a count. Not in an xdist controller, which runs no test and
    whose environment the workers would inherit."""
    if getattr(config.option, "numprocesses", None) and "PYTEST_XDIST_WORKER" not in os.environ:
        return
    torch.set_num_threads(int(os.environ.setdefault("OMP_NUM_THREADS", str(cores_per_worker()))))


@pytest.fixture
def exact_cuda_float32() -> Iterator[None]:
    """TF32 off for CUDA float32 comparisons: cuDNN enables it by default, and its 10-bit mantissa alone would
    exceed the tolerances that tell a faithful fast path from a wrong one. Restores the previous flags."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous
