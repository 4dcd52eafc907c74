"""Datasets and the mini-batches fed to training and evaluation.

`build_loaders` turns the `data` section of params.yaml into shuffled train batches, ordered test batches and a
`DatasetInfo` describing the inputs. Datasets come from a registry of builders (see `available_datasets`):

- digits: scikit-learn's bundled 8×8 digits, written once to `<root>/digits/` by `materialize_digits` (the CLI
  `python -m pipeline.data digits --root data`), so the default experiment runs offline; held whole in memory.
- mnist, cifar10, cifar100: the torchvision datasets, downloaded only when `data.download` is true.
- imagefolder: ImageNet-style class folders under `<root>/train` and `<root>/val`.

`data.loader` chooses how mnist and cifar are served: `device` keeps the whole dataset in the run's device memory
(GPU or host) as uint8 and augments there (`pipeline.data.batches`), `workers` uses DataLoader worker processes
(`data.num_workers`, `auto` = the machine's cores, at most 8) with pinned memory, each sample's augmentation
seeded by the run's seed, the epoch and the sample (`pipeline.data.sample_seeds`); `auto` is `device` when the
dataset fits comfortably in the free memory (`pipeline.data.feeding.in_memory`), on CPU as on CUDA.

Modules: `spec` (what builders share), `batches` (in-memory batches), `feeding` (in memory or DataLoader),
`digits`, `torchvision_sets` (the dataset builders); this one is the registry.

Missing or unreadable data raises a `DataError` that says how to get it; DVC tracks the data folder.
"""

from __future__ import annotations

from typing import Callable

import torch

from pipeline.config import DataConfig
from pipeline.data.digits import build_digits
from pipeline.data.spec import Feed, Loaders
from pipeline.data.torchvision_sets import build_cifar10, build_cifar100, build_imagefolder, build_mnist
from pipeline.errors import ConfigError


def available_datasets() -> list[str]:
    """Names accepted by `data.name`, sorted."""
    return sorted(_BUILDERS)


def build_loaders(config: DataConfig, *, batch_size: int, seed: int, device: torch.device, rank: int = 0,
                  world_size: int = 1) -> Loaders:
    """Train batches (shuffled, reproducible per seed), test batches (in order) and the dataset's description.

    Under DDP (`world_size` > 1) each process gets its `rank`'s share of every global batch of `batch_size`;
    every process evaluates on the whole test split.
    """
    builder = _BUILDERS.get(config.name)
    if builder is None:
        raise ConfigError(f"params.yaml: 'data.name' '{config.name}' is unknown. "
                          f"Available: {', '.join(available_datasets())}. Fix it in params.yaml.")
    return builder(config, Feed(batch_size=batch_size, seed=seed, device=torch.device(device), rank=rank,
                                 world_size=world_size))


_BUILDERS: dict[str, Callable[[DataConfig, Feed], Loaders]] = {
    "cifar10": build_cifar10,
    "cifar100": build_cifar100,
    "digits": build_digits,
    "imagefolder": build_imagefolder,
    "mnist": build_mnist,
}
