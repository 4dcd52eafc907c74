"""The torchvision datasets: MNIST, CIFAR-10/100 (downloaded only when `data.download` is true) and ImageNet-style
class folders under `<root>/train` and `<root>/val`. Missing or unreadable data raises a `DataError` that says how
to get it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from pipeline.config import DataConfig
from pipeline.data.feeding import dataloaders, in_memory, memory_batches, output_channels
from pipeline.data.spec import DatasetInfo, Feed, Loaders
from pipeline.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)


def build_mnist(config: DataConfig, feed: Feed) -> Loaders:
    """MNIST resized to 32×32 (as in the paper) unless `data.image_size` says otherwise; not augmented."""
    size = config.image_size or 32
    channels = output_channels(1, config.channels, config.name)
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
    if in_memory(config, feed, (len(train_set) + len(test_set)) * size * size):
        def resident(dataset: datasets.MNIST) -> Tensor:
            return transforms.functional.resize(dataset.data.unsqueeze(1), [size, size], antialias=True)

        return memory_batches(resident(train_set), train_set.targets, resident(test_set), test_set.targets,
                              augment=False, mean=MNIST_MEAN * channels, std=MNIST_STD * channels,
                              channels=channels, resize_to=None, config=config, feed=feed) + (info,)
    return dataloaders(train_set, test_set, config, feed) + (info,)


def build_cifar10(config: DataConfig, feed: Feed) -> Loaders:
    """CIFAR-10, normalized with ImageNet statistics as in the paper's reference code."""
    return _build_cifar(datasets.CIFAR10, "CIFAR-10", IMAGENET_MEAN, IMAGENET_STD, config, feed)


def build_cifar100(config: DataConfig, feed: Feed) -> Loaders:
    """CIFAR-100, normalized with its own statistics as in the paper's reference code."""
    return _build_cifar(datasets.CIFAR100, "CIFAR-100", CIFAR100_MEAN, CIFAR100_STD, config, feed)


def _build_cifar(dataset_class: type[datasets.CIFAR10], title: str, mean: Sequence[float], std: Sequence[float],
                 config: DataConfig, feed: Feed) -> Loaders:
    """A CIFAR dataset with the standard pad-crop-flip augmentation on the train split when `data.augment`."""
    output_channels(3, config.channels, config.name)
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
    if in_memory(config, feed, train_set.data.nbytes + test_set.data.nbytes):
        def resident(dataset: datasets.CIFAR10) -> Tensor:
            return torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()

        return memory_batches(resident(train_set), torch.tensor(train_set.targets), resident(test_set),
                              torch.tensor(test_set.targets), augment=config.augment, mean=mean, std=std,
                              channels=3, resize_to=size, config=config, feed=feed) + (info,)
    return dataloaders(train_set, test_set, config, feed) + (info,)


def build_imagefolder(config: DataConfig, feed: Feed) -> Loaders:
    """ImageNet-style folders with the usual random-resized-crop training and resize-center-crop evaluation.

    `data.image_size` replaces the 224 crop; the resize before the center crop keeps the 256/224 ratio.
    """
    output_channels(3, config.channels, config.name)
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
    return dataloaders(train_set, test_set, config, feed) + (info,)


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
