"""Where and how computation runs: device choice, seeding and mixed precision."""

from __future__ import annotations

import contextlib
import random
from typing import ContextManager

import numpy as np
import torch

from pipeline.errors import ConfigError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; an explicitly requested device that is absent is an error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"params.yaml: 'device' is '{name}' but this machine has no CUDA GPU. "
                          f"Use `device: auto` (CUDA when present, else CPU) or `device: cpu`.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("params.yaml: 'device' is 'mps' but MPS is not available here. Use `device: auto`.")
    return device


def check_amp(amp: str, device: torch.device) -> None:
    """Autocast is a CUDA fast path; asking for it elsewhere is refused rather than silently ignored."""
    if amp != "fp32" and device.type != "cuda":
        raise ConfigError(f"params.yaml: 'amp' is '{amp}' but the stage runs on {device.type}; mixed precision is "
                          f"only supported on CUDA. Set `amp: fp32` for this machine.")


def autocast(device: torch.device, amp: str) -> ContextManager:
    """Mixed-precision context for the forward pass (a no-op with amp 'fp32')."""
    if amp == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def seed_everything(seed: int) -> None:
    """Seed every RNG a stage touches so reruns start from the same state."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
