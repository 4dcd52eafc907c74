"""Self-describing checkpoints that load with `torch.load(weights_only=True)`.

A checkpoint is a plain dict: format tag and version, the architecture (model spec, classes, options, input
shape), where its code came from (`source`: the timm/torchvision version or the factory file's sha256), the
pruning spec (indices of removed filters, relative to the dense architecture), the state_dict, the resolved
settings and metrics. A pruned checkpoint rebuilds its small network on its own: build the dense
architecture, remove the recorded filters, load the weights. No `nn.Module` is ever pickled. Tensors are always
read onto the CPU first (`map_location="cpu"`), so checkpoints written on a GPU machine load on a laptop.

`dense_model` is the pipeline's starting point: random, torchvision's published weights or a user's file.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.errors import CheckpointError
from pipeline.files import atomic_write_bytes
from pipeline.models import create_model
from pipeline.models.sources import pretrained_state_dict, source_record
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
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "architecture": architecture.to_dict(),
        "source": source_record(architecture.name),
        "pruned": None if pruned is None else {name: idx.cpu() for name, idx in pruned.items()},
        "state_dict": {key: value.detach().cpu() for key, value in model.state_dict().items()},
        "config": dict(config),
        "metrics": dict(metrics),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue())
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


def dense_model(model: ModelConfig, architecture: Architecture) -> nn.Module:
    """The dense network the pipeline starts from: random (seeded by the caller), torchvision's published weights
    (`model.pretrained`), or a weights file (`model.checkpoint`: a dense checkpoint of this pipeline or a plain
    state_dict such as torchvision's .pth). A head of another class count is kept fresh (fine-tuning to new
    classes); any other difference is a CheckpointError."""
    network = architecture.build()
    if model.pretrained:
        load_dense_weights(network, pretrained_state_dict(architecture.name), f"the published '{architecture.name}'")
    elif model.checkpoint:
        load_dense_weights(network, _dense_weights_file(Path(model.checkpoint), architecture), model.checkpoint)
    return network


def load_dense_weights(network: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy `state_dict` into `network`, every tensor by name and shape, except a classifier head of another class
    count, which stays freshly initialised."""
    own = network.state_dict()
    head = _head_prefix(network)
    missing = [key for key in own if key not in state_dict]
    unexpected = [key for key in state_dict if key not in own]
    wrong_shape = [key for key in own if key in state_dict and tuple(state_dict[key].shape) != tuple(own[key].shape)]
    head_only = all(head is not None and key.startswith(head) for key in wrong_shape)
    if missing or unexpected or not head_only:
        problems = [f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
                    f"other shapes at {wrong_shape[:3]}" if not head_only else ""]
        raise CheckpointError(f"The weights of {source} do not fit the '{type(network).__name__}' built from "
                              f"model.name and model.options ({'; '.join(p for p in problems if p)}). They belong "
                              f"to another architecture or options: set model.name/model.options to the ones they "
                              f"were trained with, or point model.checkpoint at matching weights.")
    network.load_state_dict({key: value for key, value in state_dict.items() if key not in wrong_shape},
                            strict=not wrong_shape)


def _head_prefix(network: nn.Module) -> Optional[str]:
    """State-dict prefix of the last Linear layer: the classifier, the only part a new class count changes."""
    linears = [name for name, module in network.named_modules() if isinstance(module, nn.Linear)]
    return f"{linears[-1]}." if linears else None


def _dense_weights_file(path: Path, architecture: Architecture) -> Mapping[str, torch.Tensor]:
    """The tensors of a user's weights file: our dense checkpoint (its architecture must be this one) or a plain
    state_dict."""
    if not path.is_file():
        raise CheckpointError(f"model.checkpoint is '{path}', which does not exist. Give the path (relative to the "
                              f"repository root) of a dense checkpoint of this pipeline or a plain state_dict .pth.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"model.checkpoint '{path}' is not a readable PyTorch weights file "
                              f"({type(error).__name__}). Give a dense checkpoint of this pipeline or a state_dict "
                              f"saved with torch.save(model.state_dict(), path).") from None
    if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
        recorded = Architecture.from_dict(payload["architecture"])
        if payload["pruned"] or recorded.name != architecture.name or recorded.options != architecture.options:
            raise CheckpointError(f"model.checkpoint '{path}' holds a {'pruned ' if payload['pruned'] else ''}"
                                  f"'{recorded.name}' with options {recorded.options}, but the pipeline builds a "
                                  f"dense '{architecture.name}' with {architecture.options}. Start from a dense "
                                  f"checkpoint (models/dense.pt of a run) of the same model.name and options.")
        return payload["state_dict"]
    if not isinstance(payload, dict) or not all(isinstance(value, torch.Tensor) for value in payload.values()):
        raise CheckpointError(f"model.checkpoint '{path}' is neither a checkpoint of this pipeline nor a plain "
                              f"state_dict (a dict of tensors). Save weights with torch.save(model.state_dict(), "
                              f"path).")
    return payload


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
