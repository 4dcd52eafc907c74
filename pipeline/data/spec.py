"""What every dataset builder shares: the description of a dataset and how its batches are served."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from pipeline.data.batches import TensorBatches

@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about its inputs, plus the split sizes for logging."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    train_size: int
    test_size: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Channels, height, width of one input image."""
        return self.in_channels, self.image_size, self.image_size


Batches = TensorBatches | DataLoader
Loaders = tuple[Batches, Batches, DatasetInfo]


@dataclass(frozen=True)
class Feed:
    """How batches are served, independent of which dataset they come from."""

    batch_size: int
    seed: int
    device: torch.device
    rank: int = 0
    world_size: int = 1
