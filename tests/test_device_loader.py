"""The device-resident loader against the torchvision path, on small files written in the datasets' real formats."""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
from collections import Counter
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
from torch import nn
from torchvision import datasets
from torchvision.transforms import functional as TF

from pipeline.config import DataConfig, config_from_mapping, read_settings
from pipeline.data import IMAGENET_MEAN, IMAGENET_STD, TensorBatches, build_loaders
from pipeline.data import feeding
from pipeline.data.batches import ImageTransform
from pipeline.data.feeding import MAX_AUTO_WORKERS
from pipeline.errors import ConfigError
from pipeline.runtime import Runtime
from pipeline.training.loop import fit, sgd
from pipeline.training.state import ResumeFile
from test_train import Crash, CrashAfter

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[1]
IMAGES_PER_FILE = 40
EPOCHS = 5
ROW_CODE, COLUMN_CODE = 0, 1


def code(position: int) -> int:
    """Pixel value that encodes a row or column number: nonzero, so the crop's zero padding is told apart."""
    return 5 + 7 * position


def coded_images(count: int) -> np.ndarray:
    """N×32×32×3 uint8: channel 0 encodes the row, channel 1 the column, channel 2 the image's number + 1."""
    rows = np.broadcast_to(np.array([code(r) for r in range(32)], dtype=np.uint8)[:, None], (32, 32))
    images = np.empty((count, 32, 32, 3), dtype=np.uint8)
    images[..., ROW_CODE], images[..., COLUMN_CODE] = rows, rows.T
    images[..., 2] = (np.arange(count, dtype=np.uint8) + 1)[:, None, None]
    return images


def write_cifar10(root: Path, monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    """CIFAR-10 in torchvision's layout (pickled dicts of N×3072 uint8 rows as R, G, B planes); torchvision's
    expected md5s are pointed at these files, as in test_data.py. Returns the train images in file order."""
    folder = root / datasets.CIFAR10.base_folder
    folder.mkdir(parents=True)
    files = datasets.CIFAR10.train_list + datasets.CIFAR10.test_list
    images = coded_images(IMAGES_PER_FILE * len(files))
    for index, (name, _) in enumerate(files):
        chunk = images[index * IMAGES_PER_FILE:(index + 1) * IMAGES_PER_FILE]
        batch = {"batch_label": name, "data": chunk.transpose(0, 3, 1, 2).reshape(len(chunk), -1),
                 "labels": [int(k) % 10 for k in range(len(chunk))],
                 "filenames": [f"{name}_{k}.png" for k in range(len(chunk))]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"label_names": [f"class_{k}" for k in range(10)], "num_cases_per_batch": IMAGES_PER_FILE}
    (folder / datasets.CIFAR10.meta["filename"]).write_bytes(pickle.dumps(meta, protocol=2))

    def md5(name: str) -> str:
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    monkeypatch.setattr(datasets.CIFAR10, "train_list", [[n, md5(n)] for n, _ in datasets.CIFAR10.train_list])
    monkeypatch.setattr(datasets.CIFAR10, "test_list", [[n, md5(n)] for n, _ in datasets.CIFAR10.test_list])
    monkeypatch.setattr(datasets.CIFAR10, "meta",
                        {**datasets.CIFAR10.meta, "md5": md5(datasets.CIFAR10.meta["filename"])})
    return images[:IMAGES_PER_FILE * len(datasets.CIFAR10.train_list)]


def cifar_loaders(root: Path, loader: str, batch_size: int = 50, seed: int = 0, **options):
    config = DataConfig(name="cifar10", root=str(root), loader=loader, num_workers=0, **options)
    return build_loaders(config, batch_size=batch_size, seed=seed, device=CPU)


def as_uint8(inputs: torch.Tensor) -> torch.Tensor:
    """Undo Normalize and ToTensor: the uint8 pixels the model was fed."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((inputs * std + mean) * 255).round().to(torch.uint8)


Draw = Tuple[int, int, int, bool]


def decode(pixels: torch.Tensor) -> Draw:
    """(image number, dy, dx, flipped) of one augmented 3×32×32 uint8 image.

    Output row and column 16 always lie inside the original image: row 16 shows original row dy + 12; column 16
    shows original column dx + 12, or dx + 11 when flipped (output column c reads crop column 31 − c).
    """
    row = (int(pixels[ROW_CODE, 16, 16]) - 5) // 7
    column = (int(pixels[COLUMN_CODE, 16, 16]) - 5) // 7
    flipped = int(pixels[COLUMN_CODE, 16, 15]) > int(pixels[COLUMN_CODE, 16, 16])
    return int(pixels[2, 16, 16]) - 1, row - 12, column - (11 if flipped else 12), flipped


def expected_view(image: np.ndarray, dy: int, dx: int, flipped: bool) -> torch.Tensor:
    """torchvision's own functional ops: pad 4 with zeros, crop 32×32 at (dy, dx), flip."""
    tensor = TF.crop(TF.pad(torch.from_numpy(image).permute(2, 0, 1), [4]), dy, dx, 32, 32)
    return TF.hflip(tensor) if flipped else tensor


def augmented_epochs(train) -> Tuple[List[Draw], List[torch.Tensor], torch.Tensor]:
    """Decoded draws, uint8 views and the batch-wise per-channel means and stds over EPOCHS epochs."""
    draws, views, moments = [], [], []
    for _ in range(EPOCHS):
        for inputs, _ in train:
            moments.append(torch.stack([inputs.mean(dim=(0, 2, 3)), inputs.std(dim=(0, 2, 3))]))
            for pixels in as_uint8(inputs):
                draws.append(decode(pixels))
                views.append(pixels)
    return draws, views, torch.stack(moments).mean(dim=0)


def frequencies(values: List[int]) -> Dict[int, float]:
    counts = Counter(values)
    return {value: counts[value] / len(values) for value in range(9)}


def test_device_augmentation_matches_torchvision_statistics_and_pixels(tmp_path, monkeypatch):
    images = write_cifar10(tmp_path, monkeypatch)
    statistics = {}
    for loader in ("workers", "device"):
        train, _, _ = cifar_loaders(tmp_path, loader, augment=True)
        assert isinstance(train, TensorBatches) == (loader == "device")
        draws, views, moments = augmented_epochs(train)
        for (number, dy, dx, flipped), view in zip(draws, views):
            assert torch.equal(view, expected_view(images[number], dy, dx, flipped)), (loader, number, dy, dx)
        numbers = Counter(number for number, *_ in draws)
        assert set(numbers.values()) == {EPOCHS} and len(numbers) == len(images)
        statistics[loader] = (frequencies([d[1] for d in draws]), frequencies([d[2] for d in draws]),
                              sum(d[3] for d in draws) / len(draws), moments)
    for path in statistics.values():
        dy, dx, flip_fraction, _ = path
        assert all(abs(share - 1 / 9) < 0.04 for share in (*dy.values(), *dx.values())), path
        assert abs(flip_fraction - 0.5) < 0.04
    (dy_t, dx_t, flip_t, moments_t), (dy_d, dx_d, flip_d, moments_d) = statistics["workers"], statistics["device"]
    assert max(abs(dy_t[k] - dy_d[k]) for k in range(9)) < 0.05
    assert max(abs(dx_t[k] - dx_d[k]) for k in range(9)) < 0.05
    assert abs(flip_t - flip_d) < 0.05
    assert torch.allclose(moments_t, moments_d, atol=0.05), (moments_t, moments_d)


def test_device_test_split_equals_torchvision_exactly(tmp_path, monkeypatch):
    write_cifar10(tmp_path, monkeypatch)
    _, test_workers, info_workers = cifar_loaders(tmp_path, "workers", eval_batch_size=16)
    _, test_device, info_device = cifar_loaders(tmp_path, "device", eval_batch_size=16)
    assert info_workers == info_device and len(test_workers) == len(test_device) == 3
    for (inputs_w, targets_w), (inputs_d, targets_d) in zip(test_workers, test_device):
        assert torch.equal(targets_w, targets_d)
        assert torch.allclose(inputs_w, inputs_d, atol=1e-6)


def device_batches(seed: int = 3, rank: int = 0, world_size: int = 1) -> TensorBatches:
    images = torch.from_numpy(coded_images(37)).permute(0, 3, 1, 2)
    transform = ImageTransform(augment=True, mean=IMAGENET_MEAN, std=IMAGENET_STD, channels=3)
    return TensorBatches(images, torch.arange(37), 8, shuffle=True, seed=seed, rank=rank, world_size=world_size,
                         transform=transform)


def test_restored_generator_and_iterate_from_replay_an_interrupted_epoch():
    batches = device_batches()
    next(iter(batches))
    state = batches.generator.get_state()
    whole = list(batches)
    batches.generator.set_state(state)
    rest = list(batches.iterate_from(2))
    assert len(whole) == len(batches) == 5 and len(rest) == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole[2:], rest))
    assert not torch.equal(whole[0][1], list(batches)[0][1])


def test_ranks_split_every_global_batch_between_them():
    single = list(device_batches())
    shards = [list(device_batches(rank=rank, world_size=2)) for rank in (0, 1)]
    for index, (inputs, targets) in enumerate(single):
        for rank in (0, 1):
            assert torch.equal(shards[rank][index][1], targets[rank::2])
            assert torch.equal(shards[rank][index][0], inputs[rank::2])


def write_mnist(root: Path, count: int = 12) -> None:
    """The four uncompressed IDX files torchvision's MNIST reads (magic 0x00 0x00 0x08 <dims>, big-endian sizes)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    generator = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        for suffix, array in (("images-idx3-ubyte", generator.integers(0, 256, (count, 28, 28))),
                              ("labels-idx1-ubyte", np.arange(count) % 10)):
            header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">i", n) for n in array.shape)
            (raw / f"{prefix}-{suffix}").write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("channels", [None, 3])
def test_device_mnist_matches_torchvision_up_to_resize_rounding(tmp_path, channels):
    """PIL's and torch's antialiased 28→32 resizes round differently by at most a few gray levels."""
    write_mnist(tmp_path)
    served = {}
    for loader in ("workers", "device"):
        config = DataConfig(name="mnist", root=str(tmp_path), loader=loader, num_workers=0, channels=channels)
        _, test, info = build_loaders(config, batch_size=4, seed=0, device=CPU)
        served[loader] = next(iter(test))
    (inputs_w, targets_w), (inputs_d, targets_d) = served["workers"], served["device"]
    assert inputs_d.shape == inputs_w.shape == (12, channels or 1, 32, 32) and torch.equal(targets_w, targets_d)
    assert (inputs_w - inputs_d).abs().max() < 4 / 255 / 0.3081
    assert (inputs_w - inputs_d).abs().mean() < 0.5 / 255 / 0.3081


def test_auto_workers_are_the_cores_at_most_eight_and_persist(tmp_path, monkeypatch):
    write_cifar10(tmp_path, monkeypatch)
    config = DataConfig(name="cifar10", root=str(tmp_path), loader="workers", num_workers="auto")
    train, test, _ = build_loaders(config, batch_size=50, seed=0, device=CPU)
    assert train.num_workers == min(len(os.sched_getaffinity(0)), MAX_AUTO_WORKERS) >= 1
    assert train.persistent_workers and test.persistent_workers


def test_auto_loader_holds_cifar_in_memory_on_cpu_when_it_fits(tmp_path, monkeypatch):
    write_cifar10(tmp_path, monkeypatch)
    config = DataConfig(name="cifar10", root=str(tmp_path), loader="auto", num_workers=0)
    train, test, _ = build_loaders(config, batch_size=50, seed=0, device=CPU)
    assert isinstance(train, TensorBatches) and isinstance(test, TensorBatches)
    dataset_bytes = 6 * IMAGES_PER_FILE * 3 * 32 * 32
    monkeypatch.setattr(feeding, "free_memory", lambda device: int(dataset_bytes / feeding.MEMORY_SHARE) - 1)
    train, _, _ = build_loaders(config, batch_size=50, seed=0, device=CPU)
    assert isinstance(train, torch.utils.data.DataLoader), "a dataset that does not fit goes to worker processes"


@pytest.mark.parametrize("edits, key", [
    ({"loader": "gpu"}, "data.loader"),
    ({"loader": "device", "name": "imagefolder"}, "data.loader"),
    ({"num_workers": "many"}, "data.num_workers"),
    ({"num_workers": -1}, "data.num_workers"),
])
def test_bad_loader_settings_are_config_errors_naming_the_key(edits, key):
    raw = read_settings(REPO / "params.yaml")
    raw["data"].update(edits)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config_from_mapping(raw)


def trained_on_cifar(data: Path, run: Path, workers: int, hooks: CrashAfter) -> nn.Module:
    """A seeded conv net trained 2 epochs on augmented CIFAR batches from DataLoader workers (10 batches an epoch),
    a resume file written every 4 steps."""
    config = DataConfig(name="cifar10", root=str(data), loader="workers", num_workers=workers, augment=True)
    train, test, _ = build_loaders(config, batch_size=20, seed=5, device=CPU)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))
    resume = ResumeFile(run / "resume.pt", "same", announce=lambda line: None)
    fit(model, train, test, sgd(model, 0.05, 0.9, 0.0), runtime=Runtime(CPU, checkpoint_every=4), epochs=2,
        hooks=hooks, resume=resume)
    return model


def test_dataloader_training_resumed_with_fresh_workers_equals_one_without_workers(tmp_path, monkeypatch):
    """Each sample's crop and flip are seeded by (seed, epoch, sample): neither the worker count nor restarted
    persistent workers change them, and the resumed epoch skips its first batches without loading them."""
    write_cifar10(tmp_path / "data", monkeypatch)
    reference = trained_on_cifar(tmp_path / "data", tmp_path / "reference", 0, CrashAfter())
    with pytest.raises(Crash):
        trained_on_cifar(tmp_path / "data", tmp_path / "run", 2, CrashAfter(crash_at=13))
    saved = torch.load(tmp_path / "run" / "resume.pt", weights_only=True)
    assert (saved["step"], saved["epoch"], saved["batch"]) == (12, 2, 2)
    resumed = trained_on_cifar(tmp_path / "data", tmp_path / "run", 2, CrashAfter())
    for name, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_each_epoch_draws_new_augmentation_when_iterated_without_the_training_loop(tmp_path, monkeypatch):
    write_cifar10(tmp_path, monkeypatch)
    train, _, _ = cifar_loaders(tmp_path, "workers", augment=True)
    by_epoch = [{decode(pixels)[0]: decode(pixels)[1:] for inputs, _ in train for pixels in as_uint8(inputs)}
                for _ in range(2)]
    assert by_epoch[0].keys() == by_epoch[1].keys() and by_epoch[0] != by_epoch[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_loader_on_cuda_gives_the_bytes_it_gives_on_the_cpu(tmp_path, monkeypatch):
    """Order, crops and flips come from one seeded CPU generator; the gather, flip and normalisation are exact
    elementwise ops. So the GPU-resident loader's batches on CUDA equal its CPU batches bit for bit, every epoch."""
    write_cifar10(tmp_path, monkeypatch)
    config = DataConfig(name="cifar10", root=str(tmp_path), loader="device", num_workers=0)
    loaders = {device: build_loaders(config, batch_size=48, seed=5, device=torch.device(device))[:2]
               for device in ("cpu", "cuda")}
    for epoch in range(2):
        for split in (0, 1):
            pairs = list(zip(loaders["cpu"][split], loaders["cuda"][split]))
            assert len(pairs) == len(loaders["cpu"][split]) > 1
            for (cpu_inputs, cpu_targets), (cuda_inputs, cuda_targets) in pairs:
                assert cuda_inputs.device.type == "cuda"
                assert torch.equal(cuda_inputs.cpu(), cpu_inputs), (epoch, split)
                assert torch.equal(cuda_targets.cpu(), cpu_targets), (epoch, split)
