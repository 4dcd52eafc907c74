"""Mini-batches sliced from whole datasets held in memory (host or accelerator), optionally augmented there.

Small datasets need none of DataLoader's per-sample work: one index per batch is all. MNIST and CIFAR (150 MB as
uint8) fit in any GPU's memory and in any host's; keeping them as uint8 and doing the padded random crop, the
horizontal flip and the normalisation on the device (`ImageTransform`) removes the per-image PIL work that makes
a GPU machine with few cores input-bound (a DataLoader of 8 workers serves about 20k CIFAR images/s, a ResNet56
step in a CUDA graph consumes 14k/s). The semantics are torchvision's `RandomCrop(32, padding=4)` (zero padding,
offsets uniform in 0..2·padding) then `RandomHorizontalFlip()` (p = 0.5), then `ToTensor` and `Normalize`.

All randomness of an epoch (its order, every sample's crop offsets and flip) is drawn when the epoch starts from
one seeded CPU `generator`, so the sequence of epochs is the same in every process for the same seed, the draws do
not depend on the device, and restoring the generator's state and calling `iterate_from(first_batch)` replays an
interrupted epoch exactly.

Under DDP (`world_size` > 1) every process draws the same epoch and keeps its share (`rank`::`world_size`) of each
global batch, so the processes together see exactly one global batch. No share is ever empty: a last batch smaller
than the process count is folded into the one before it. Shares of one batch may differ by one sample; DDP's
gradient average is then weighted by share (`pipeline.training.distributed.wrap`), so it equals the gradient of
the global batch's mean loss.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

CROP_PADDING = 4
FLIP_PROBABILITY = 0.5
UINT8_MAX = 255
Draws = Optional[Tuple[Tensor, Tensor]]


class ImageTransform:
    """uint8 N×C×H×W images → normalised floats on their device: optional crop-and-flip augmentation, optional
    resize (bilinear, antialiased, after augmentation as torchvision's Resize after the crop), a gray channel
    repeated to `channels`, then (x − mean) / std with one `mean`/`std` entry per output channel."""

    def __init__(self, *, augment: bool, mean: Sequence[float], std: Sequence[float], channels: int,
                 resize_to: Optional[int] = None, device: torch.device = torch.device("cpu")) -> None:
        self.augment, self.channels, self.resize_to = augment, channels, resize_to
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def draw(self, count: int, generator: torch.Generator, device: torch.device) -> Draws:
        """Every sample's crop offsets (dy, dx) and flip for one epoch (None without augmentation)."""
        if not self.augment:
            return None
        offsets = torch.randint(0, 2 * CROP_PADDING + 1, (count, 2), generator=generator)
        flips = torch.rand(count, generator=generator) < FLIP_PROBABILITY
        return offsets.to(device), flips.to(device)

    def __call__(self, images: Tensor, index: Tensor, draws: Draws) -> Tensor:
        if draws is not None:
            offsets, flips = draws
            images = crop_and_flip(images, offsets[index], flips[index], CROP_PADDING)
        inputs = images.float().div_(UINT8_MAX)
        if self.resize_to is not None and self.resize_to != inputs.shape[-1]:
            inputs = F.interpolate(inputs, size=(self.resize_to, self.resize_to), mode="bilinear",
                                   align_corners=False, antialias=True)
        if inputs.shape[1] != self.channels:
            inputs = inputs.expand(-1, self.channels, -1, -1)
        return (inputs - self.mean).div_(self.std)


class TensorBatches:
    """Mini-batches of whole tensors kept on `device` (default: where they are): shuffled per epoch from a
    generator seeded once, resumable mid-epoch, sharded over DDP processes, optionally passed through `transform`
    (then `inputs` must be N×C×H×W uint8)."""

    def __init__(self, inputs: Tensor, targets: Tensor, batch_size: int, *, shuffle: bool, seed: int = 0,
                 device: Optional[torch.device] = None, rank: int = 0, world_size: int = 1,
                 transform: Optional[ImageTransform] = None) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"inputs ({len(inputs)}) and targets ({len(targets)}) differ in length")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        if transform is not None and (inputs.dtype != torch.uint8 or inputs.dim() != 4):
            raise ValueError(f"images must be N×C×H×W uint8, not {tuple(inputs.shape)} {inputs.dtype}")
        if len(targets) < world_size:
            raise ValueError(f"{len(targets)} samples cannot be shared by {world_size} processes")
        self.inputs = inputs.to(device) if device is not None else inputs
        self.targets = targets.to(device) if device is not None else targets
        self.batch_size, self.shuffle, self.transform = batch_size, shuffle, transform
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.bounds = batch_bounds(len(targets), batch_size, world_size)

    def __len__(self) -> int:
        return len(self.bounds)

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        return self.iterate_from(0)

    def iterate_from(self, first_batch: int) -> Iterator[Tuple[Tensor, Tensor]]:
        """This epoch's batches from number `first_batch` on (the earlier ones are not produced at all)."""
        order, draws = self._epoch_draws()
        for start, stop in self.bounds[first_batch:]:
            index = order[start:stop][self.rank::self.world_size]
            inputs = self.inputs[index]
            if self.transform is not None:
                inputs = self.transform(inputs, index, draws)
            yield inputs, self.targets[index]

    def _epoch_draws(self) -> Tuple[Tensor, Draws]:
        """The epoch's sample order (a new permutation when shuffling) and the transform's draws, on the device."""
        count, device = len(self.targets), self.targets.device
        if self.shuffle:
            order = torch.randperm(count, generator=self.generator).to(device)
        else:
            order = torch.arange(count, device=device)
        draws = self.transform.draw(count, self.generator, device) if self.transform is not None else None
        return order, draws


def batch_bounds(count: int, batch_size: int, world_size: int = 1) -> List[Tuple[int, int]]:
    """(start, stop) of each global batch of an epoch: full batches, then the rest, which is folded into the
    batch before it when it has fewer samples than there are processes (a process would get none)."""
    bounds = [(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < world_size:
        (start, _), (_, stop) = bounds[-2:]
        bounds[-2:] = [(start, stop)]
    return bounds


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
