"""The offline default dataset: scikit-learn's bundled 8×8 digits, written once to `<root>/digits/` by
`materialize_digits` (the CLI `python -m pipeline.data digits --root data`) and held whole in memory."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.config import DataConfig
from pipeline.data.batches import TensorBatches
from pipeline.data.feeding import output_channels
from pipeline.data.spec import DatasetInfo, Feed, Loaders
from pipeline.errors import DataError

DIGITS_FILES = ("train_images", "train_labels", "test_images", "test_labels")
DIGITS_MAX_VALUE = 16
DIGITS_CLASSES = 10
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


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


def build_digits(config: DataConfig, feed: Feed) -> Loaders:
    """The 8×8 digits, scaled to [0, 1] and standardized with the train split's mean and std.

    No augmentation (crops and flips make no sense on 8×8 digits), so `data.augment` is ignored. The optional
    resize to `data.image_size` happens once here, not per batch, and before the statistics are taken.
    """
    arrays = _read_digits(Path(config.root))
    channels = output_channels(1, config.channels, config.name)
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
