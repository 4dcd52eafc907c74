"""Datasets held whole in device memory, augmented and normalised there, batch by batch.

CIFAR-10/100 (150 MB as uint8) and MNIST fit in any GPU's memory. Keeping them there as uint8 and doing the
padded random crop, the horizontal flip and the normalisation on the device removes the per-image PIL work that
makes a GPU machine with few cores input-bound (a DataLoader of 8 workers serves about 20k CIFAR images/s, a
ResNet56 step in a CUDA graph consumes 14k/s). The semantics are torchvision's `RandomCrop(32, padding=4)` (zero
padding, offsets uniform in 0..2·padding) then `RandomHorizontalFlip()` (p = 0.5), then `ToTensor` and
`Normalize`.

All randomness of an epoch (its order, every sample's crop offsets and flip) is drawn when the epoch starts from
one seeded CPU `generator`, so restoring the generator's state and calling `iterate_from(first_batch)` replays an
interrupted epoch exactly, as `TensorBatches` does, and the draws do not depend on the device.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

CROP_PADDING = 4
FLIP_PROBABILITY = 0.5
UINT8_MAX = 255


class DeviceBatches:
    """Mini-batches of uint8 images kept on `device`, cropped, flipped and normalised there.

    `images` is N×C×H×W uint8; `mean`/`std` have one entry per output channel (a gray image is repeated to
    `channels`). With `augment`, each sample gets a random crop of its zero-padded image and a random flip;
    `resize_to` resizes after augmentation (bilinear, antialiased), as torchvision's Resize after the crop does.
    Under DDP (`world_size` > 1) every process draws the same epoch and keeps its share (`rank`::`world_size`) of
    each global batch, like `TensorBatches`.
    """

    def __init__(self, images: Tensor, targets: Tensor, batch_size: int, *, shuffle: bool, augment: bool,
                 mean: Sequence[float], std: Sequence[float], channels: Optional[int] = None,
                 resize_to: Optional[int] = None, seed: int = 0, device: torch.device = torch.device("cpu"),
                 rank: int = 0, world_size: int = 1) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be N×C×H×W uint8, not {tuple(images.shape)} {images.dtype}")
        if len(images) != len(targets):
            raise ValueError(f"images ({len(images)}) and targets ({len(targets)}) differ in length")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.images = images.to(device)
        self.targets = targets.to(device)
        self.batch_size, self.shuffle, self.augment = batch_size, shuffle, augment
        self.channels = channels or images.shape[1]
        self.resize_to = resize_to
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.targets) / self.batch_size)

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        return self.iterate_from(0)

    def iterate_from(self, first_batch: int) -> Iterator[Tuple[Tensor, Tensor]]:
        """This epoch's batches from number `first_batch` on (the earlier ones are not produced at all)."""
        order, offsets, flips = self._epoch_draws()
        for start in range(first_batch * self.batch_size, len(order), self.batch_size):
            index = order[start:start + self.batch_size][self.rank::self.world_size]
            images = self.images[index]
            if self.augment:
                images = crop_and_flip(images, offsets[index], flips[index], CROP_PADDING)
            yield self._normalized(images), self.targets[index]

    def _epoch_draws(self) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """The epoch's order and, with augmentation, every sample's crop offsets (dy, dx) and flip, on the device."""
        count, device = len(self.targets), self.targets.device
        if self.shuffle:
            order = torch.randperm(count, generator=self.generator).to(device)
        else:
            order = torch.arange(count, device=device)
        if not self.augment:
            return order, None, None
        offsets = torch.randint(0, 2 * CROP_PADDING + 1, (count, 2), generator=self.generator)
        flips = torch.rand(count, generator=self.generator) < FLIP_PROBABILITY
        return order, offsets.to(device), flips.to(device)

    def _normalized(self, images: Tensor) -> Tensor:
        """uint8 → [0, 1] floats (ToTensor), optionally resized, channels repeated, then (x − mean) / std."""
        inputs = images.float().div_(UINT8_MAX)
        if self.resize_to is not None and self.resize_to != inputs.shape[-1]:
            inputs = F.interpolate(inputs, size=(self.resize_to, self.resize_to), mode="bilinear",
                                   align_corners=False, antialias=True)
        if inputs.shape[1] != self.channels:
            inputs = inputs.expand(-1, self.channels, -1, -1)
        return (inputs - self.mean).div_(self.std)


def crop_and_flip(images: Tensor, offsets: Tensor, flips: Tensor, padding: int) -> Tensor:
    """Per-sample crop of the zero-padded images at `offsets` (dy, dx in 0..2·padding), mirrored where `flips`.

    One gather over the padded batch: output column c of a flipped sample reads crop column W−1−c, exactly
    torchvision's crop-then-flip.
    """
    count, channels, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    device = images.device
    rows = offsets[:, 0, None] + torch.arange(height, device=device)
    columns = torch.arange(width, device=device).expand(count, width)
    columns = torch.where(flips[:, None], width - 1 - columns, columns) + offsets[:, 1, None]
    return padded[torch.arange(count, device=device)[:, None, None, None],
                  torch.arange(channels, device=device)[None, :, None, None],
                  rows[:, None, :, None], columns[:, None, None, :]]
