"""A synthetic CIFAR-10 file set in the real on-disk format, so the benchmark reads data through the pipeline's own
loader (torchvision's CIFAR10 class, or the device-resident loader) without the 170 MB download.

torchvision checks every file against the md5 of the published archive; synthetic files can never match, so
`write_cifar10` points the class's expected checksums at the files it wrote, for this process only. The
integrity check itself still runs.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
from torchvision import datasets

CLASSES = 10
COLOURS = np.array([[48, 48, 48], [48, 128, 48], [48, 208, 48], [128, 48, 48], [128, 128, 48], [128, 208, 48],
                    [208, 48, 48], [208, 128, 48], [208, 208, 48], [128, 48, 208]])   # one RGB colour per class


def write_cifar10(root: Path, train_images: int, test_images: int, seed: int = 0, learnable: bool = False) -> Path:
    """Five train files and one test file of random uint8 images (N×3072 rows, R, G, B planes) and labels.

    `learnable` images are their class's colour under noise (a colour survives crops and flips), so a network
    learns them to a high test accuracy within a few epochs (an accuracy check then means something); otherwise
    pure noise."""
    folder = root / datasets.CIFAR10.base_folder
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(seed)
    train_files = len(datasets.CIFAR10.train_list)
    sizes = [train_images // train_files + (index < train_images % train_files) for index in range(train_files)]
    names = [name for name, _ in datasets.CIFAR10.train_list + datasets.CIFAR10.test_list]
    for name, count in zip(names, sizes + [test_images]):
        data = generator.integers(0, 256, (count, 3072), dtype=np.uint8)
        labels = generator.integers(0, CLASSES, count)
        if learnable:
            data = (np.repeat(COLOURS[labels], 1024, axis=1) + (data.astype(np.int64) - 128) // 3).astype(np.uint8)
        batch = {"batch_label": name, "data": data, "labels": labels.tolist(),
                 "filenames": [f"{name}_{index}.png" for index in range(count)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta_name = datasets.CIFAR10.meta["filename"]
    meta = {"label_names": [f"class_{label}" for label in range(CLASSES)], "num_cases_per_batch": sizes[0]}
    (folder / meta_name).write_bytes(pickle.dumps(meta, protocol=2))
    _accept_checksums(folder)
    return root


def _accept_checksums(folder: Path) -> None:
    def md5(name: str) -> str:
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    datasets.CIFAR10.train_list = [[name, md5(name)] for name, _ in datasets.CIFAR10.train_list]
    datasets.CIFAR10.test_list = [[name, md5(name)] for name, _ in datasets.CIFAR10.test_list]
    datasets.CIFAR10.meta = {**datasets.CIFAR10.meta, "md5": md5(datasets.CIFAR10.meta["filename"])}
