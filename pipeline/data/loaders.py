"""Datasets and the mini-batches fed to training and evaluation.

`build_loaders` turns the `data` section of params.yaml into shuffled train batches, ordered test batches and a
`DatasetInfo` describing the inputs. Datasets come from a registry of builders (see `available_datasets`):

- digits: scikit-learn's bundled 8×8 digits, written once to `<root>/digits/` by `materialize_digits` (the CLI
  `python -m pipeline.data digits --root data`), so the default experiment runs offline; held whole in memory.
- mnist, cifar10, cifar100: the torchvision datasets, downloaded only when `data.download` is true.
- imagefolder: ImageNet-style class folders under `<root>/train` and `<root>/val`.

`data.loader` chooses how mnist and cifar are served: `device` keeps the whole dataset in device memory as uint8
and augments there (`pipeline.data.device`), `workers` uses DataLoader worker processes (`data.num_workers`,
`auto` = the machine's cores, at most 8) with pinned memory, each sample's augmentation seeded by the run's seed,
the epoch and the sample (`pipeline.data.sample_seeds`); `auto` is `device` on CUDA and `workers` elsewhere.

Missing or unreadable data raises a `DataError` that says how to get it; DVC tracks the data folder.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler
from torchvision import datasets, transforms

from pipeline.config import DataConfig
from pipeline.data.device import DeviceBatches
from pipeline.data.sample_seeds import SeededDataset, SeededSamples
from pipeline.errors import ConfigError, DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)

DIGITS_FILES = ("train_images", "train_labels", "test_images", "test_labels")
DIGITS_MAX_VALUE = 16
DIGITS_CLASSES = 10
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
MAX_AUTO_WORKERS = 8


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


class TensorBatches:
    """Mini-batches sliced from whole tensors kept in memory, optionally already on the accelerator.

    Small datasets need none of DataLoader's per-sample work: one index per batch is all. Shuffled batches follow
    a fresh permutation every epoch, drawn from `generator` (seeded once), so the sequence of epoch orders is the
    same in every process for the same seed; a resumed run restores the generator's state and starts mid-epoch
    with `iterate_from`. Under DDP (`world_size` > 1) every process draws the same permutation and keeps its
    share (`rank`::`world_size`) of each global batch, so the processes together see exactly one global batch.
    """

    def __init__(self, inputs: Tensor, targets: Tensor, batch_size: int, *, shuffle: bool, seed: int = 0,
                 device: Optional[torch.device] = None, rank: int = 0, world_size: int = 1) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"inputs ({len(inputs)}) and targets ({len(targets)}) differ in length")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.inputs = inputs.to(device) if device is not None else inputs
        self.targets = targets.to(device) if device is not None else targets
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.targets) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.iterate_from(0)

    def iterate_from(self, first_batch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """This epoch's batches from number `first_batch` on (the earlier ones are not produced at all)."""
        order = self._epoch_order()
        for start in range(first_batch * self.batch_size, len(order), self.batch_size):
            index = order[start:start + self.batch_size][self.rank::self.world_size]
            yield self.inputs[index], self.targets[index]

    def _epoch_order(self) -> Tensor:
        """This epoch's sample order: a new permutation when shuffling, else the stored order."""
        count = len(self.targets)
        if not self.shuffle:
            return torch.arange(count, device=self.targets.device)
        return torch.randperm(count, generator=self.generator).to(self.targets.device)


Batches = TensorBatches | DeviceBatches | DataLoader
Loaders = tuple[Batches, Batches, DatasetInfo]


@dataclass(frozen=True)
class _Feed:
    """How batches are served, independent of which dataset they come from."""

    batch_size: int
    seed: int
    device: torch.device
    rank: int = 0
    world_size: int = 1


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
    return builder(config, _Feed(batch_size=batch_size, seed=seed, device=torch.device(device), rank=rank,
                                 world_size=world_size))


def materialize_digits(root: Path) -> Path:
    """Write scikit-learn's bundled digits to `root/digits/` as .npy files, split 80/20 stratified.

    np.save of plain arrays writes the same bytes on every run (np.savez would not: its zip entries carry
    timestamps), so DVC's hash of the folder, and hence `dvc status`, stays unchanged after re-materializing.
    """
    # scikit-learn is imported here, not at module level, because only this offline step needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.uint8)
    labels = digits.target.astype(np.int64)
    train_images, test_images, train_labels, test_labels = train_test_split(
        images, labels, test_size=DIGITS_TEST_FRACTION, stratify=labels, random_state=DIGITS_SPLIT_SEED)
    folder = Path(root) / "digits"
    folder.mkdir(parents=True, exist_ok=True)
    arrays = dict(zip(DIGITS_FILES, (train_images, train_labels, test_images, test_labels)))
    for name, array in arrays.items():
        np.save(folder / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
    return folder


def _build_digits(config: DataConfig, feed: _Feed) -> Loaders:
    """The 8×8 digits, scaled to [0, 1] and standardized with the train split's mean and std.

    No augmentation (crops and flips make no sense on 8×8 digits), so `data.augment` is ignored. The optional
    resize to `data.image_size` happens once here, not per batch, and before the statistics are taken.
    """
    arrays = _read_digits(Path(config.root))
    channels = _output_channels(1, config.channels, config.name)
    train_images = _scaled_digits(arrays["train_images"], config.image_size)
    test_images = _scaled_digits(arrays["test_images"], config.image_size)
    mean, std = train_images.mean(), train_images.std()
    train_inputs = ((train_images - mean) / std).repeat(1, channels, 1, 1)
    test_inputs = ((test_images - mean) / std).repeat(1, channels, 1, 1)
    train_targets = torch.from_numpy(arrays["train_labels"]).long()
    test_targets = torch.from_numpy(arrays["test_labels"]).long()
    info = DatasetInfo(name=config.name, num_classes=DIGITS_CLASSES, in_channels=channels,
                       image_size=train_inputs.shape[-1], train_size=len(train_targets),
                       test_size=len(test_targets))
    train = TensorBatches(train_inputs, train_targets, feed.batch_size, shuffle=True, seed=feed.seed,
                          device=feed.device, rank=feed.rank, world_size=feed.world_size)
    test = TensorBatches(test_inputs, test_targets, config.eval_batch_size, shuffle=False, device=feed.device)
    return train, test, info


def _read_digits(root: Path) -> dict[str, np.ndarray]:
    """The four digits arrays written by `materialize_digits`, or a DataError saying how to write them."""
    folder = root / "digits"
    how_to_fix = f"Create them with `python -m pipeline.data digits --root {root}` (or `make data`)."
    missing = [f"{name}.npy" for name in DIGITS_FILES if not (folder / f"{name}.npy").is_file()]
    if missing:
        raise DataError(f"The digits dataset is missing from {folder} (no {', '.join(missing)}). {how_to_fix}")
    try:
        arrays = {name: np.load(folder / f"{name}.npy", allow_pickle=False) for name in DIGITS_FILES}
    except ValueError as error:
        raise DataError(f"The digits files in {folder} cannot be read ({error}). {how_to_fix}") from None
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.shape != (len(images),):
            raise DataError(f"The digits {split} files in {folder} do not match (images {images.shape}, "
                            f"labels {labels.shape}). {how_to_fix}")
    return arrays


def _scaled_digits(images: np.ndarray, image_size: Optional[int]) -> Tensor:
    """N×8×8 values 0..16 as N×1×S×S floats in [0, 1], bilinearly resized when a size is asked for."""
    scaled = torch.from_numpy(images).float().div(DIGITS_MAX_VALUE).unsqueeze(1)
    if image_size is None or image_size == scaled.shape[-1]:
        return scaled
    return F.interpolate(scaled, size=(image_size, image_size), mode="bilinear", align_corners=False)


def _build_mnist(config: DataConfig, feed: _Feed) -> Loaders:
    """MNIST resized to 32×32 (as in the paper) unless `data.image_size` says otherwise; not augmented."""
    size = config.image_size or 32
    channels = _output_channels(1, config.channels, config.name)
    repeat_gray = [transforms.Grayscale(num_output_channels=3)] if channels == 3 else []
    transform = transforms.Compose([transforms.Resize(size), *repeat_gray, transforms.ToTensor(),
                                    transforms.Normalize(MNIST_MEAN * channels, MNIST_STD * channels)])
    root = Path(config.root)
    files = [Path(name).stem for name, _ in datasets.MNIST.resources]
    source = _Source(title="MNIST", folder=root / "MNIST" / "raw", files=files, root=root,
                     fetch=f"the four .gz files from {datasets.MNIST.mirrors[0]}, uncompressed with gunzip")
    train_set = _open(lambda download: datasets.MNIST(root, train=True, transform=transform, download=download),
                      config.download, source)
    test_set = _open(lambda download: datasets.MNIST(root, train=False, transform=transform, download=download),
                     config.download, source)
    info = DatasetInfo(name=config.name, num_classes=len(train_set.classes), in_channels=channels,
                       image_size=size, train_size=len(train_set), test_size=len(test_set))
    if _on_device(config, feed):
        def resident(dataset: datasets.MNIST) -> Tensor:
            return transforms.functional.resize(dataset.data.unsqueeze(1), [size, size], antialias=True)

        return _device_batches(resident(train_set), train_set.targets, resident(test_set), test_set.targets,
                               augment=False, mean=MNIST_MEAN * channels, std=MNIST_STD * channels,
                               channels=channels, resize_to=None, config=config, feed=feed) + (info,)
    return _dataloaders(train_set, test_set, config, feed) + (info,)


def _build_cifar10(config: DataConfig, feed: _Feed) -> Loaders:
    """CIFAR-10, normalized with ImageNet statistics as in the paper's reference code."""
    return _build_cifar(datasets.CIFAR10, "CIFAR-10", IMAGENET_MEAN, IMAGENET_STD, config, feed)


def _build_cifar100(config: DataConfig, feed: _Feed) -> Loaders:
    """CIFAR-100, normalized with its own statistics as in the paper's reference code."""
    return _build_cifar(datasets.CIFAR100, "CIFAR-100", CIFAR100_MEAN, CIFAR100_STD, config, feed)


def _build_cifar(dataset_class: type[datasets.CIFAR10], title: str, mean: Sequence[float], std: Sequence[float],
                 config: DataConfig, feed: _Feed) -> Loaders:
    """A CIFAR dataset with the standard pad-crop-flip augmentation on the train split when `data.augment`."""
    _output_channels(3, config.channels, config.name)
    size = config.image_size or 32
    tail = ([transforms.Resize(size)] if size != 32 else []) + [transforms.ToTensor(),
                                                                transforms.Normalize(mean, std)]
    augment = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if config.augment else []
    train_transform, test_transform = transforms.Compose(augment + tail), transforms.Compose(tail)
    root = Path(config.root)
    files = [name for name, _ in dataset_class.train_list + dataset_class.test_list] + [
        dataset_class.meta["filename"]]
    source = _Source(title=title, folder=root / dataset_class.base_folder, files=files, root=root,
                     fetch=f"{dataset_class.url}, extracted with `tar xzf` inside {root}")
    train_set = _open(lambda download: dataset_class(root, train=True, transform=train_transform,
                                                     download=download), config.download, source)
    test_set = _open(lambda download: dataset_class(root, train=False, transform=test_transform,
                                                    download=download), config.download, source)
    info = DatasetInfo(name=config.name, num_classes=len(train_set.classes), in_channels=3, image_size=size,
                       train_size=len(train_set), test_size=len(test_set))
    if _on_device(config, feed):
        def resident(dataset: datasets.CIFAR10) -> Tensor:
            return torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()

        return _device_batches(resident(train_set), torch.tensor(train_set.targets), resident(test_set),
                               torch.tensor(test_set.targets), augment=config.augment, mean=mean, std=std,
                               channels=3, resize_to=size, config=config, feed=feed) + (info,)
    return _dataloaders(train_set, test_set, config, feed) + (info,)


def _build_imagefolder(config: DataConfig, feed: _Feed) -> Loaders:
    """ImageNet-style folders with the usual random-resized-crop training and resize-center-crop evaluation.

    `data.image_size` replaces the 224 crop; the resize before the center crop keeps the 256/224 ratio.
    """
    _output_channels(3, config.channels, config.name)
    crop = config.image_size or 224
    resize = int(crop * 256 / 224)
    tail = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    center = [transforms.Resize(resize), transforms.CenterCrop(crop)]
    augment = [transforms.RandomResizedCrop(crop), transforms.RandomHorizontalFlip()]
    root = Path(config.root)
    train_set = _open_image_folder(root, "train", transforms.Compose((augment if config.augment else center) + tail))
    test_set = _open_image_folder(root, "val", transforms.Compose(center + tail))
    if train_set.classes != test_set.classes:
        only_train = sorted(set(train_set.classes) - set(test_set.classes))
        only_val = sorted(set(test_set.classes) - set(train_set.classes))
        raise DataError(f"The class folders of {root / 'train'} and {root / 'val'} differ (only in train: "
                        f"{only_train[:5]}, only in val: {only_val[:5]}). Both splits need the same class "
                        f"folders so that label numbers mean the same class.")
    info = DatasetInfo(name=config.name, num_classes=len(train_set.classes), in_channels=3, image_size=crop,
                       train_size=len(train_set), test_size=len(test_set))
    return _dataloaders(train_set, test_set, config, feed) + (info,)


def _open_image_folder(root: Path, split: str, transform: Callable) -> datasets.ImageFolder:
    """One split of an image-folder dataset, or a DataError describing the expected layout."""
    folder = root / split
    layout = (f"The imagefolder dataset is expected as {root}/train/<class>/*.jpeg and {root}/val/<class>/*.jpeg "
              f"(one sub-folder per class, the same classes in both splits; ImageNet's validation images must be "
              f"sorted into class folders). `data.download` does not apply: ImageNet needs registration at "
              f"image-net.org. Place the images there, then record them with `dvc add {root}`.")
    if not folder.is_dir():
        raise DataError(f"{folder} does not exist. {layout}")
    try:
        return datasets.ImageFolder(str(folder), transform=transform)
    except FileNotFoundError as error:
        raise DataError(f"{folder} holds no usable images ({error}). {layout}") from None


@dataclass(frozen=True)
class _Source:
    """Where a downloadable dataset must lie, for messages that say exactly how to get it."""

    title: str
    folder: Path
    files: list[str]
    root: Path
    fetch: str


def _open(factory: Callable[[bool], Dataset], download: bool, source: _Source) -> Dataset:
    """Construct a torchvision dataset, turning its not-found and download failures into DataErrors."""
    place = f"place {', '.join(source.files)} in {source.folder} (from {source.fetch})"
    record = f"then record the data folder with `dvc add {source.root}` so DVC tracks it"
    try:
        return factory(download)
    except (OSError, RuntimeError) as error:
        if download:
            detail = " ".join(str(error).split())[:300] or type(error).__name__
            raise DataError(f"Downloading {source.title} failed ({detail}); this machine probably cannot reach "
                            f"the internet. Either run once on a machine with internet access, or {place} "
                            f"yourself and set `data.download: false` in params.yaml; {record}.") from None
        raise DataError(f"{source.title} was not found (or failed its checksum) in {source.folder}. Either set "
                        f"`data.download: true` in params.yaml and run once on a machine with internet access, "
                        f"or {place}; {record}.") from None


def worker_count(setting: int | str) -> int:
    """`data.num_workers` as a number: `auto` is the cores this process may use, at most MAX_AUTO_WORKERS.

    The count changes only speed: each sample's augmentation is seeded by the sample itself (`SeededSamples`).
    """
    if setting != "auto":
        return int(setting)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cores, MAX_AUTO_WORKERS)


def _on_device(config: DataConfig, feed: _Feed) -> bool:
    """Whether `data.loader` puts this (mnist or cifar) dataset in device memory: `auto` does so on CUDA."""
    return config.loader == "device" or (config.loader == "auto" and feed.device.type == "cuda")


def _device_batches(train_images: Tensor, train_targets: Tensor, test_images: Tensor, test_targets: Tensor, *,
                    augment: bool, mean: Sequence[float], std: Sequence[float], channels: int,
                    resize_to: Optional[int], config: DataConfig, feed: _Feed) -> tuple[DeviceBatches, DeviceBatches]:
    """Train (shuffled, augmented when asked, this rank's share) and test batches served from device memory."""
    common = dict(mean=mean, std=std, channels=channels, resize_to=resize_to, device=feed.device)
    train = DeviceBatches(train_images, train_targets.long(), feed.batch_size, shuffle=True, augment=augment,
                          seed=feed.seed, rank=feed.rank, world_size=feed.world_size, **common)
    test = DeviceBatches(test_images, test_targets.long(), config.eval_batch_size, shuffle=False, augment=False,
                         **common)
    return train, test


def _dataloaders(train_set: Dataset, test_set: Dataset, config: DataConfig,
                 feed: _Feed) -> tuple[DataLoader, DataLoader]:
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


def _output_channels(native: int, requested: Optional[int], dataset: str) -> int:
    """The channel count fed to the model: the native one, or 3 for a gray dataset (channel repeated)."""
    if requested is None or requested == native:
        return native
    if native == 1 and requested == 3:
        return 3
    options = f"null (native {native})" + (" or 3 (gray channel repeated)" if native == 1 else "")
    raise ConfigError(f"params.yaml: 'data.channels' {requested} is not supported for {dataset}; use {options}. "
                      f"Fix it in params.yaml.")


_BUILDERS: dict[str, Callable[[DataConfig, _Feed], Loaders]] = {
    "cifar10": _build_cifar10,
    "cifar100": _build_cifar100,
    "digits": _build_digits,
    "imagefolder": _build_imagefolder,
    "mnist": _build_mnist,
}
