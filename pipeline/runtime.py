"""Where and how computation runs: device choice, numerics, seeding and the resolved `Runtime` of a stage."""

from __future__ import annotations

import contextlib
import functools
import os
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Optional

import numpy as np
import torch

from pipeline.config import TrainerConfig
from pipeline.errors import ConfigError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"
NATIVE_BF16_CAPABILITY = (8, 0)   # Ampere: bf16 tensor cores; older GPUs emulate bf16, slower than fp32
NVIDIA_DRIVER_FILE = Path("/proc/driver/nvidia/version")
MINIMUM_DRIVER = {13: "580", 12: "525", 11: "450"}   # CUDA major version of the torch build → Linux driver needed


@dataclass(frozen=True)
class Runtime:
    """How a stage computes, resolved once from the settings: every `auto` already decided.

    `rank` and `world_size` describe the process group when the stage runs under torchrun (DDP); a single
    process is rank 0 of 1. `sync_bn`: BatchNorm statistics over the global batch when several processes train. `checkpoint_every` is the step interval of resume checkpoints (0: epoch ends only).
    """

    device: torch.device
    amp: str = "fp32"
    step: str = "eager"
    channels_last: bool = False
    checkpoint_every: int = 0
    rank: int = 0
    world_size: int = 1
    sync_bn: bool = False

    @property
    def is_main(self) -> bool:
        """Only the main process logs, tracks and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; an explicitly requested device that is absent is an error, not a fallback.
    An NVIDIA GPU that this PyTorch build cannot use (usually a driver older than its CUDA needs) is said once."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        reason = unusable_gpu()
        if reason is not None:
            _warn_once(f"{reason} `device: auto` runs every stage on the CPU.")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"params.yaml: 'device' is '{name}' but this process has no usable CUDA GPU. "
                          f"{unusable_gpu() or ''} Use `device: auto` (CUDA when usable, else CPU) or "
                          f"`device: cpu`.".replace("  ", " "))
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"params.yaml: 'device' is '{name}' but this machine has {torch.cuda.device_count()} "
                          f"CUDA GPU(s), numbered from 0. Use `device: auto` or an existing cuda:N.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("params.yaml: 'device' is 'mps' but MPS is not available here. Use `device: auto`.")
    return device


def nvidia_driver_version() -> Optional[str]:
    """The loaded NVIDIA kernel driver's version (e.g. '570.86.15'), or None when no NVIDIA driver is loaded."""
    try:
        text = NVIDIA_DRIVER_FILE.read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+(?:\.\d+)+)", text)
    return match.group(1) if match else "unknown"


def unusable_gpu() -> Optional[str]:
    """Why an NVIDIA GPU that is present cannot be used by this PyTorch, or None (none present, or usable)."""
    driver = nvidia_driver_version()
    if driver is None or torch.cuda.is_available():
        return None
    present = f"An NVIDIA driver is loaded (version {driver}) but this PyTorch ({torch.__version__}) cannot use a GPU"
    if torch.version.cuda is None:
        return f"{present}: it is a CPU-only build; install the locked CUDA build (`make setup`)."
    major = int(torch.version.cuda.split(".")[0])
    needed = MINIMUM_DRIVER.get(major)
    if needed is not None and _version(driver) < _version(needed):
        return (f"{present}: it is built for CUDA {torch.version.cuda}, which needs driver {needed} or newer. "
                f"Update the NVIDIA driver, or install a PyTorch build for a CUDA version your driver supports.")
    return (f"{present} (built for CUDA {torch.version.cuda}; the driver is recent enough): no GPU is visible to "
            f"this process. Check CUDA_VISIBLE_DEVICES, the container's GPU access (`--gpus`) and `nvidia-smi`.")


def _version(text: str) -> tuple:
    return tuple(int(part) for part in re.findall(r"\d+", text))


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def native_bf16(device: torch.device) -> bool:
    """Whether this CUDA GPU computes bf16 in hardware (compute capability 8.0, Ampere, or newer)."""
    return tuple(torch.cuda.get_device_capability(device)) >= NATIVE_BF16_CAPABILITY


def resolve_amp(amp: str, device: torch.device) -> str:
    """`auto` is bf16 on a CUDA GPU that computes it natively (the fast path) and fp32 elsewhere: older GPUs
    emulate bf16, slower than fp32, which this says once. Explicit mixed precision off CUDA is refused rather than
    silently ignored."""
    if amp == "auto":
        if device.type != "cuda":
            return "fp32"
        if native_bf16(device):
            return "bf16"
        major, minor = torch.cuda.get_device_capability(device)
        _warn_once(f"amp: auto chose fp32 on {torch.cuda.get_device_name(device)} (compute capability "
                   f"{major}.{minor}): it has no native bf16 (8.0 and newer have), and emulated bf16 is slower than "
                   f"fp32. For mixed precision on it set `amp: fp16` (with a gradient scaler; not with "
                   f"`trainer.step: graph`).")
        return "fp32"
    if amp != "fp32" and device.type != "cuda":
        raise ConfigError(f"params.yaml: 'amp' is '{amp}' but the stage runs on {device.type}; mixed precision is "
                          f"only supported on CUDA. Set `amp: auto` (fp32 off CUDA) or `amp: fp32`.")
    return amp


def resolve_runtime(trainer: TrainerConfig, device: torch.device, amp: str, rank: int = 0,
                    world_size: int = 1) -> Runtime:
    """Turn the trainer settings into a `Runtime`, refusing what this device cannot do."""
    if trainer.step == "graph" and device.type != "cuda":
        raise ConfigError(f"params.yaml: 'trainer.step' is 'graph' but the stage runs on {device.type}; CUDA graphs "
                          f"need a CUDA GPU. Use `trainer.step: eager` (or `compile`) on this machine.")
    amp = resolve_amp(amp, device)
    if trainer.step == "graph":
        check_graph_mode(amp, trainer.devices * trainer.nodes)
    channels_last = trainer.memory_format == "channels_last" or (
        trainer.memory_format == "auto" and device.type == "cuda")
    return Runtime(device=device, amp=amp, step=trainer.step, channels_last=channels_last,
                   checkpoint_every=trainer.checkpoint_every, rank=rank, world_size=world_size,
                   sync_bn=trainer.sync_bn is not False)


def check_graph_mode(amp: str, processes: int) -> None:
    """Refuse the combinations a single captured CUDA graph cannot replay faithfully."""
    if amp == "fp16":
        raise ConfigError("params.yaml: 'trainer.step' is 'graph' with 'amp: fp16', but fp16's GradScaler checks "
                          "every step for overflow on the host and skips or rescales steps, which a captured "
                          "CUDA graph cannot do. Use `amp: bf16` (or `auto`) with `trainer.step: graph`, or keep "
                          "fp16 with `trainer.step: compile` or `eager`.")
    if processes > 1:
        raise ConfigError(f"params.yaml: 'trainer.step' is 'graph' with {processes} processes, but this pipeline "
                          f"captures CUDA graphs for one process only (DDP's gradient all-reduce is not captured). "
                          f"Use `trainer.step: compile` with `trainer.devices` > 1, or `trainer.devices: 1` with "
                          f"`graph`.")


def configure_numerics(trainer: TrainerConfig, device: torch.device) -> None:
    """TF32 only when asked. On CUDA, cuDNN autotunes its convolution algorithms (the fixed batch shapes of a
    training run make that pay at once) unless deterministic algorithms are asked for; CPU kernels are
    deterministic already. Every flag is set both ways, so a study's later runs never inherit an earlier one's."""
    deterministic = trainer.deterministic and device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = trainer.tf32
    torch.backends.cudnn.allow_tf32 = trainer.tf32
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic
    torch.use_deterministic_algorithms(deterministic)


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
