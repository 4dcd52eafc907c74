"""Self-describing checkpoints that load with `torch.load(weights_only=True)`.

A checkpoint is a plain dict: format tag and version, the architecture (registry name, classes, options, input
shape), the pruning spec (indices of removed filters, relative to the dense architecture), the state_dict, the
resolved settings and metrics. A pruned checkpoint rebuilds its small network on its own: build the dense
architecture, remove the recorded filters, load the weights. No `nn.Module` is ever pickled.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from pipeline.errors import CheckpointError
from pipeline.models import create_model
from pipeline.pruning.surgery import remove_filters

CHECKPOINT_FORMAT = "tpp-pipeline/checkpoint"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class Architecture:
    """Everything needed to rebuild a dense network from the model registry."""

    name: str
    num_classes: int
    input_shape: Tuple[int, int, int]
    options: Dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        in_channels, image_size = self.input_shape[0], self.input_shape[-1]
        return create_model(self.name, self.num_classes, in_channels=in_channels, image_size=image_size,
                            **self.options)

    def example_inputs(self, device: torch.device = torch.device("cpu")) -> torch.Tensor:
        """A one-sample batch for tracing the dependency graph and counting MACs."""
        return torch.zeros(1, *self.input_shape, device=device)

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "num_classes": self.num_classes, "input_shape": list(self.input_shape),
                "options": dict(self.options)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Architecture":
        return cls(data["name"], int(data["num_classes"]), tuple(data["input_shape"]), dict(data["options"]))


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt model and what was recorded with it."""

    model: nn.Module
    architecture: Architecture
    pruned: Optional[Dict[str, torch.Tensor]]
    config: Dict[str, Any]
    metrics: Dict[str, Any]


def save_checkpoint(path: Path, model: nn.Module, architecture: Architecture, *,
                    pruned: Optional[Mapping[str, torch.Tensor]] = None, config: Mapping[str, Any],
                    metrics: Mapping[str, Any]) -> str:
    """Write atomically (temp file + rename, so a kill never leaves half a file); return the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "architecture": architecture.to_dict(),
        "pruned": None if pruned is None else {name: idx.cpu() for name, idx in pruned.items()},
        "state_dict": {key: value.detach().cpu() for key, value in model.state_dict().items()},
        "config": dict(config),
        "metrics": dict(metrics),
    }
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)
    return file_sha256(path)


def load_checkpoint(path: Path, *, device: torch.device = torch.device("cpu"),
                    expected_model: Optional[str] = None) -> Checkpoint:
    """Read and rebuild a checkpoint; any file that is not one of ours, or does not fit, is a CheckpointError."""
    path = Path(path)
    payload = _read_payload(path)
    architecture = Architecture.from_dict(payload["architecture"])
    if expected_model is not None and architecture.name != expected_model:
        raise CheckpointError(f"{path} holds a '{architecture.name}' network but '{expected_model}' was expected. "
                              f"Rerun the stage that makes it (`dvc repro`) after changing model.name.")
    model = architecture.build()
    pruned = payload["pruned"]
    try:
        if pruned:
            remove_filters(model, pruned, architecture.example_inputs())
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError, IndexError) as error:
        raise CheckpointError(f"{path} does not match its own architecture record ('{architecture.name}', pruning "
                              f"spec of {len(pruned or {})} layers): {str(error).splitlines()[0]}. The file was "
                              f"edited or written by another version; regenerate it with `dvc repro`.") from None
    return Checkpoint(model.to(device), architecture, pruned, payload["config"], payload["metrics"])


def check_matches_data(checkpoint: Checkpoint, path: Path, num_classes: int, input_shape: Tuple[int, ...]) -> None:
    """A network trained for other classes or another input shape cannot be evaluated on this dataset."""
    architecture = checkpoint.architecture
    if architecture.num_classes != num_classes or tuple(architecture.input_shape) != tuple(input_shape):
        raise CheckpointError(f"{path} was made for {architecture.num_classes} classes and inputs of shape "
                              f"{tuple(architecture.input_shape)}, but the dataset gives {num_classes} classes and "
                              f"{tuple(input_shape)}. The data settings changed since it was made; rerun the "
                              f"pipeline (`dvc repro`).")


def file_sha256(path: Path) -> str:
    """Content hash, logged with runs so a result can be traced to the exact checkpoint bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_payload(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist. Run the stage that produces it (`dvc repro`), "
                              f"or fetch it from the DVC remote with `dvc pull`.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupted, truncated or not a tpp-pipeline "
                              f"file: {type(error).__name__}). Restore it with `dvc checkout` or regenerate it with "
                              f"`dvc repro`.") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is a PyTorch file but not a tpp-pipeline checkpoint (no '{CHECKPOINT_FORMAT}' "
                              f"format tag). Point the stage at a checkpoint written by this pipeline.")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {payload.get('version')}; this code reads version "
                              f"{CHECKPOINT_VERSION}. Regenerate it with `dvc repro`.")
    return payload
