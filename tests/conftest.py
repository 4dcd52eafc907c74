"""Fixtures shared by test modules."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch


@pytest.fixture
def exact_cuda_float32() -> Iterator[None]:
    """TF32 off for CUDA float32 comparisons: cuDNN enables it by default, and its 10-bit mantissa alone would
    exceed the tolerances that tell a faithful fast path from a wrong one. Restores the previous flags."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous
