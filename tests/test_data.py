"""Tests of pipeline.data on small files written in each dataset's real on-disk format."""

from __future__ import annotations

import hashlib
import pickle
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

from pipeline.config import DataConfig
from pipeline.data import (CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN, IMAGENET_STD, MNIST_MEAN, MNIST_STD,
                           DatasetInfo, TensorBatches, available_datasets, build_loaders, materialize_digits)
from pipeline.errors import ConfigError, DataError

CPU = torch.device("cpu")
CIFAR_PIXEL = (51, 102, 204)
MNIST_PIXEL = 200
IMAGES_PER_CIFAR_FILE = 4


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def loaders(name: str, root: Path, batch_size: int = 64, seed: int = 0, **options):
    config = DataConfig(name=name, root=str(root), **{"num_workers": 0, **options})  # in-process unless asked
    return build_loaders(config, batch_size=batch_size, seed=seed, device=CPU)


def epoch_targets(batches) -> list[int]:
    return torch.cat([targets for _, targets in batches]).tolist()


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    materialize_digits(root)
    return root


# --- digits -----------------------------------------------------------------------------------------------------

def test_materialize_digits_writes_identical_bytes_and_a_stratified_split(tmp_path: Path) -> None:
    first, second = materialize_digits(tmp_path / "a"), materialize_digits(tmp_path / "b")
    names = sorted(path.name for path in first.iterdir())
    assert names == ["test_images.npy", "test_labels.npy", "train_images.npy", "train_labels.npy"]
    assert [sha256_of(first / name) for name in names] == [sha256_of(second / name) for name in names]

    train_images, test_images = np.load(first / "train_images.npy"), np.load(first / "test_images.npy")
    train_labels, test_labels = np.load(first / "train_labels.npy"), np.load(first / "test_labels.npy")
    assert (train_images.dtype, train_labels.dtype) == (np.uint8, np.int64)
    assert train_images.shape == (1437, 8, 8) and test_images.shape == (360, 8, 8)
    assert len(train_labels) + len(test_labels) == 1797
    assert train_images.max() == 16 and train_images.min() == 0
    assert set(train_labels) == set(test_labels) == set(range(10))
    # Stratified: each class keeps its share of the whole set in the test split (within one image).
    all_counts = np.bincount(np.concatenate([train_labels, test_labels]))
    assert np.all(np.abs(np.bincount(test_labels) - all_counts * 0.2) <= 1)


def test_cli_writes_digits_where_it_says(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pipeline.data", "digits", "--root", str(tmp_path)],
                            capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
    assert result.stdout.strip().splitlines() == [f"Wrote the digits dataset to {tmp_path / 'digits'}"]
    assert (tmp_path / "digits" / "train_images.npy").is_file()


def test_digits_batches_are_standardized_and_sized(digits_root: Path) -> None:
    train, test, info = loaders("digits", digits_root, batch_size=64, eval_batch_size=100)
    assert info == DatasetInfo(name="digits", num_classes=10, in_channels=1, image_size=8,
                               train_size=1437, test_size=360)
    assert (len(train), len(test)) == (23, 4)
    batches = list(train)
    assert [len(targets) for _, targets in batches] == [64] * 22 + [1437 - 22 * 64]
    inputs, targets = batches[0]
    assert inputs.shape == (64, 1, 8, 8) and inputs.dtype == torch.float32 and targets.dtype == torch.int64
    everything = torch.cat([inputs for inputs, _ in batches])
    assert abs(everything.mean().item()) < 1e-4 and abs(everything.std().item() - 1) < 1e-3
    assert [len(targets) for _, targets in test] == [100, 100, 100, 60]


def test_digits_resize_and_channel_repeat(digits_root: Path) -> None:
    train, test, info = loaders("digits", digits_root, image_size=32, channels=3)
    inputs, _ = next(iter(train))
    assert inputs.shape[1:] == (3, 32, 32)
    assert torch.equal(inputs[:, 0], inputs[:, 2])
    assert (info.in_channels, info.image_size) == (3, 32)
    test_inputs, _ = next(iter(test))
    assert test_inputs.shape[1:] == (3, 32, 32)


def test_digits_order_is_seeded_and_changes_every_epoch(digits_root: Path) -> None:
    first_build, _, _ = loaders("digits", digits_root, seed=7)
    second_build, _, _ = loaders("digits", digits_root, seed=7)
    other_seed, _, _ = loaders("digits", digits_root, seed=8)
    first_epochs = [epoch_targets(first_build), epoch_targets(first_build)]
    assert first_epochs == [epoch_targets(second_build), epoch_targets(second_build)]
    assert first_epochs[0] != first_epochs[1]
    assert first_epochs[0] != epoch_targets(other_seed)


def test_digits_test_batches_keep_file_order(digits_root: Path) -> None:
    _, test, _ = loaders("digits", digits_root)
    assert epoch_targets(test) == np.load(digits_root / "digits" / "test_labels.npy").tolist()


def test_missing_digits_says_how_to_create_them(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"python -m pipeline\.data digits --root"):
        loaders("digits", tmp_path)


def test_tensor_batches_move_to_the_device_and_keep_partial_batch() -> None:
    batches = TensorBatches(torch.zeros(5, 1, 2, 2), torch.arange(5), 2, shuffle=False, device=CPU)
    assert len(batches) == 3
    assert [targets.tolist() for _, targets in batches] == [[0, 1], [2, 3], [4]]


# --- registry and settings --------------------------------------------------------------------------------------

def test_available_datasets_and_unknown_name(tmp_path: Path) -> None:
    assert available_datasets() == ["cifar10", "cifar100", "digits", "imagefolder", "mnist"]
    with pytest.raises(ConfigError, match="cifar10, cifar100, digits, imagefolder, mnist"):
        loaders("svhn", tmp_path)


def test_unsupported_channel_count_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.channels"):
        loaders("cifar10", tmp_path, channels=1)


# --- CIFAR ------------------------------------------------------------------------------------------------------

def write_cifar(root: Path, dataset_class: type[datasets.CIFAR10], monkeypatch: pytest.MonkeyPatch) -> None:
    """Write a tiny CIFAR in torchvision's layout: pickled dicts of uint8 N×3072 rows (R, G, B planes) and labels.

    The real files are Python 2 pickles whose str keys torchvision reads with encoding="latin1" as "data",
    "labels"...; Python 3 str keys load identically. Every image has the same colour CIFAR_PIXEL so the
    normalized values are known.

    torchvision verifies each file against the md5 of the published archive (`_check_integrity` and
    `_load_meta` call `check_integrity(path, md5)`), which synthetic files can never match. Rather than switching
    the check off, we point its expected checksums at the files written here: torchvision's integrity code still
    runs and still rejects a missing or altered file (see the corrupted-file test).
    """
    is_cifar100 = dataset_class is datasets.CIFAR100
    num_classes, label_key = (100, "fine_labels") if is_cifar100 else (10, "labels")
    folder = root / dataset_class.base_folder
    folder.mkdir(parents=True)
    image = np.concatenate([np.full(1024, value, dtype=np.uint8) for value in CIFAR_PIXEL])
    for index, (name, _) in enumerate(dataset_class.train_list + dataset_class.test_list):
        labels = [(index * IMAGES_PER_CIFAR_FILE + offset) % num_classes for offset in range(IMAGES_PER_CIFAR_FILE)]
        batch = {"batch_label": name, "data": np.stack([image] * IMAGES_PER_CIFAR_FILE), label_key: labels,
                 "filenames": [f"{name}_{offset}.png" for offset in range(IMAGES_PER_CIFAR_FILE)]}
        if is_cifar100:
            batch["coarse_labels"] = [label % 20 for label in labels]
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    class_names = [f"class_{label}" for label in range(num_classes)]
    meta = {"fine_label_names": class_names, "coarse_label_names": [f"super_{i}" for i in range(20)]} \
        if is_cifar100 else {"label_names": class_names, "num_cases_per_batch": IMAGES_PER_CIFAR_FILE}
    (folder / dataset_class.meta["filename"]).write_bytes(pickle.dumps(meta, protocol=2))

    def checksums(entries: list[list[str]]) -> list[list[str]]:
        return [[name, md5_of(folder / name)] for name, _ in entries]

    monkeypatch.setattr(dataset_class, "train_list", checksums(dataset_class.train_list))
    monkeypatch.setattr(dataset_class, "test_list", checksums(dataset_class.test_list))
    monkeypatch.setattr(dataset_class, "meta",
                        {**dataset_class.meta, "md5": md5_of(folder / dataset_class.meta["filename"])})


CIFARS = [("cifar10", datasets.CIFAR10, IMAGENET_MEAN, IMAGENET_STD, 10),
          ("cifar100", datasets.CIFAR100, CIFAR100_MEAN, CIFAR100_STD, 100)]


@pytest.mark.parametrize("loader", ["workers", "auto"])
@pytest.mark.parametrize(("name", "dataset_class", "mean", "std", "num_classes"), CIFARS)
def test_cifar_loads_the_real_format_with_the_papers_normalization(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name, dataset_class, mean, std, num_classes, loader) -> None:
    write_cifar(tmp_path, dataset_class, monkeypatch)
    train_files = len(dataset_class.train_list)
    train, test, info = loaders(name, tmp_path, batch_size=3, eval_batch_size=3, augment=False, loader=loader)
    assert info == DatasetInfo(name=name, num_classes=num_classes, in_channels=3, image_size=32,
                               train_size=train_files * IMAGES_PER_CIFAR_FILE, test_size=IMAGES_PER_CIFAR_FILE)
    assert len(train) == -(-train_files * IMAGES_PER_CIFAR_FILE // 3) and len(test) == 2
    expected = [(value / 255 - m) / s for value, m, s in zip(CIFAR_PIXEL, mean, std)]
    for inputs, targets in (next(iter(train)), next(iter(test))):
        assert inputs.shape == (3, 3, 32, 32) and inputs.dtype == torch.float32 and targets.dtype == torch.int64
        assert torch.allclose(inputs.mean(dim=(0, 2, 3)), torch.tensor(expected), atol=1e-5)
    assert epoch_targets(test) == [(train_files * IMAGES_PER_CIFAR_FILE + k) % num_classes
                                   for k in range(IMAGES_PER_CIFAR_FILE)]


def test_cifar_augmentation_is_the_same_for_every_worker_count(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Byte-identical batches with 0, 2 or 3 workers: why `data.num_workers` is no stage's dependency."""
    write_cifar(tmp_path, datasets.CIFAR10, monkeypatch)

    def two_epochs(seed: int, workers: int) -> list[tuple[bytes, bytes]]:
        train, _, _ = loaders("cifar10", tmp_path, batch_size=20, seed=seed, augment=True, num_workers=workers,
                              loader="workers")
        return [(torch.cat([inputs for inputs, _ in train]).numpy().tobytes(),
                 torch.cat([targets for _, targets in train]).numpy().tobytes()) for _ in range(2)]

    in_process = two_epochs(seed=3, workers=0)
    assert two_epochs(seed=3, workers=2) == in_process == two_epochs(seed=3, workers=3)
    assert in_process[0] != in_process[1] and two_epochs(seed=4, workers=2) != in_process


def test_corrupted_cifar_file_fails_the_integrity_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar(tmp_path, datasets.CIFAR10, monkeypatch)
    with (tmp_path / "cifar-10-batches-py" / "data_batch_3").open("ab") as batch:
        batch.write(b"\0")
    with pytest.raises(DataError, match="checksum"):
        loaders("cifar10", tmp_path)


# --- MNIST ------------------------------------------------------------------------------------------------------

def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX as on yann.lecun.com: magic 0x00 0x00 0x08 (ubyte) <dims>, big-endian int32 sizes, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">i", size) for size in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, train_count: int = 6, test_count: int = 4) -> None:
    """The four uncompressed files torchvision's MNIST reads from root/MNIST/raw (no md5 is checked for them)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, count in (("train", train_count), ("t10k", test_count)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", np.full((count, 28, 28), MNIST_PIXEL, dtype=np.uint8))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(count) % 10)


@pytest.mark.parametrize("loader", ["workers", "auto"])
@pytest.mark.parametrize("channels", [None, 3])
def test_mnist_is_resized_to_32_and_normalized(tmp_path: Path, channels, loader) -> None:
    write_mnist(tmp_path)
    train, test, info = loaders("mnist", tmp_path, batch_size=4, eval_batch_size=4, channels=channels, loader=loader)
    expected_channels = channels or 1
    assert info == DatasetInfo(name="mnist", num_classes=10, in_channels=expected_channels, image_size=32,
                               train_size=6, test_size=4)
    assert (len(train), len(test)) == (2, 1)
    inputs, targets = next(iter(test))
    assert inputs.shape == (4, expected_channels, 32, 32) and targets.tolist() == [0, 1, 2, 3]
    expected = (MNIST_PIXEL / 255 - MNIST_MEAN[0]) / MNIST_STD[0]
    assert torch.allclose(inputs, torch.full_like(inputs, expected), atol=1e-5)
    assert sorted(epoch_targets(train)) == [0, 1, 2, 3, 4, 5]


# --- imagefolder ------------------------------------------------------------------------------------------------

def write_image_folder(root: Path, train_classes=("cat", "dog"), val_classes=("cat", "dog")) -> None:
    generator = np.random.default_rng(0)
    for split, classes, count in (("train", train_classes, 3), ("val", val_classes, 2)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = generator.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")


@pytest.mark.parametrize("augment", [True, False])
def test_imagefolder_loads_class_folders(tmp_path: Path, augment: bool) -> None:
    write_image_folder(tmp_path)
    train, test, info = loaders("imagefolder", tmp_path, batch_size=4, eval_batch_size=4, image_size=32,
                                augment=augment)
    assert info == DatasetInfo(name="imagefolder", num_classes=2, in_channels=3, image_size=32,
                               train_size=6, test_size=4)
    assert (len(train), len(test)) == (2, 1)
    inputs, targets = next(iter(test))
    assert inputs.shape == (4, 3, 32, 32) and targets.tolist() == [0, 0, 1, 1]
    assert next(iter(train))[0].shape == (4, 3, 32, 32)


def test_imagefolder_splits_must_share_classes(tmp_path: Path) -> None:
    write_image_folder(tmp_path, val_classes=("cat", "fox"))
    with pytest.raises(DataError, match="differ"):
        loaders("imagefolder", tmp_path)


# --- missing data and failed downloads --------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "expected_path"), [
    ("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
    ("imagefolder", "train"), ("digits", "digits")])
def test_missing_data_says_how_to_get_it(tmp_path: Path, name: str, expected_path: str) -> None:
    with pytest.raises(DataError) as raised:
        loaders(name, tmp_path)
    message = str(raised.value)
    assert str(tmp_path / expected_path) in message
    assert "data.download" in message or "python -m pipeline.data digits" in message
    if name != "digits":
        assert f"dvc add {tmp_path}" in message


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100"])
def test_download_without_network_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  name: str) -> None:
    def no_network(*args, **kwargs):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    # torchvision fetches every file through urllib.request.urlopen; failing it is what an offline machine does.
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(DataError, match="cannot reach the internet") as raised:
        loaders(name, tmp_path, download=True)
    assert "data.download: false" in str(raised.value)


def test_per_sample_seeding_leaves_the_cuda_generators_and_the_main_stream_alone(monkeypatch) -> None:
    from pipeline.data.sample_seeds import SeededDataset

    class Draw(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int) -> torch.Tensor:
            return torch.rand(2)

    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    dataset = SeededDataset(Draw())
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    reseeded.clear()
    first, again = dataset[(1, 77)], dataset[(2, 77)]
    assert torch.equal(first, again), "the sample's draws follow its seed"
    assert torch.equal(torch.rand(3), expected), "the training process's CPU stream is restored"
    assert reseeded == [], "the CUDA generators were reseeded"
