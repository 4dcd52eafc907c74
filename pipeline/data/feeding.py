"""How a dataset's samples become batches: whole in memory (`TensorBatches`, with the uint8 augmentation on the
device) or DataLoader worker processes, and the settings that choose between them."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

from pipeline.config import DataConfig
from pipeline.data.batches import ImageTransform, TensorBatches
from pipeline.data.sample_seeds import SeededDataset, SeededSamples
from pipeline.data.spec import Feed
from pipeline.errors import ConfigError

MAX_AUTO_WORKERS = 8
# The largest part of the free memory that `data.loader: auto` lets a dataset held in memory take.
MEMORY_SHARE = 0.25


def worker_count(setting: int | str) -> int:
    """`data.num_workers` as a number: `auto` is the cores this process may use, at most MAX_AUTO_WORKERS.

    The count changes only speed: each sample's augmentation is seeded by the sample itself (`SeededSamples`).
    """
    if setting != "auto":
        return int(setting)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, MAX_AUTO_WORKERS)


def in_memory(config: DataConfig, feed: Feed, size_bytes: int) -> bool:
    """Whether `data.loader` serves this (mnist or cifar) dataset, `size_bytes` as uint8, whole from memory on the
    run's device: `device` always, `auto` when it takes at most MEMORY_SHARE of the memory free there (every
    process holds a copy), whatever the device type: in memory is far faster than per-sample PIL work on CPU too."""
    if config.loader != "auto":
        return config.loader == "device"
    return size_bytes * feed.world_size <= MEMORY_SHARE * free_memory(feed.device)


def free_memory(device: torch.device) -> int:
    """Bytes free on `device`: the GPU's free memory, else the host's available physical memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def memory_batches(train_images: Tensor, train_targets: Tensor, test_images: Tensor, test_targets: Tensor, *,
                   augment: bool, mean: Sequence[float], std: Sequence[float], channels: int,
                   resize_to: Optional[int], config: DataConfig, feed: Feed) -> tuple[TensorBatches, TensorBatches]:
    """Train (shuffled, augmented when asked, this rank's share) and test batches of uint8 images held in the
    device's memory and transformed there."""
    def transform(augmented: bool) -> ImageTransform:
        return ImageTransform(augment=augmented, mean=mean, std=std, channels=channels, resize_to=resize_to,
                              device=feed.device)

    train = TensorBatches(train_images, train_targets.long(), feed.batch_size, shuffle=True, seed=feed.seed,
                          device=feed.device, rank=feed.rank, world_size=feed.world_size,
                          transform=transform(augment))
    test = TensorBatches(test_images, test_targets.long(), config.eval_batch_size, shuffle=False,
                         device=feed.device, transform=transform(False))
    return train, test


def dataloaders(train_set: Dataset, test_set: Dataset, config: DataConfig,
                feed: Feed) -> tuple[DataLoader, DataLoader]:
    """DataLoaders whose shuffling and augmentation depend only on the seed, the epoch and the sample
    (`SeededSamples`), never on the worker count or a resume; under DDP the train order is a DistributedSampler's
    (same seed on every process, one shard each). Workers persist across epochs and batches go to a CUDA device
    through pinned memory."""
    workers = worker_count(config.num_workers)

    def loader(dataset: Dataset, batch_size: int, sampler: Optional[Sampler] = None) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                          generator=torch.Generator().manual_seed(feed.seed),
                          pin_memory=feed.device.type == "cuda", persistent_workers=workers > 0, drop_last=False)

    if feed.world_size > 1:
        order: Sampler = DistributedSampler(train_set, num_replicas=feed.world_size, rank=feed.rank, shuffle=True,
                                            seed=feed.seed)
    else:
        order = RandomSampler(train_set, generator=torch.Generator().manual_seed(feed.seed))
    train = loader(SeededDataset(train_set), feed.batch_size // feed.world_size, SeededSamples(order, feed.seed))
    return train, loader(test_set, config.eval_batch_size)


def output_channels(native: int, requested: Optional[int], dataset: str) -> int:
    """The channel count fed to the model: the native one, or 3 for a gray dataset (channel repeated)."""
    if requested is None or requested == native:
        return native
    if native == 1 and requested == 3:
        return 3
    options = f"null (native {native})" + (" or 3 (gray channel repeated)" if native == 1 else "")
    raise ConfigError(f"params.yaml: 'data.channels' {requested} is not supported for {dataset}; use {options}. "
                      f"Fix it in params.yaml.")
