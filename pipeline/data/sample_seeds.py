"""Random augmentation that is a function of (run seed, epoch, sample), not of who loads the sample or when.

A DataLoader normally draws augmentation from each worker's RNG stream, so the draws depend on the worker count
and, with persistent workers, on how long the workers have lived: a run resumed mid-epoch (new workers) or run on
a machine with another core count (`data.num_workers: auto`) would see other crops and flips. Here the sampler
pairs every index with a seed derived from the run's seed, the epoch and the index, and the dataset reseeds
torch's CPU generator from it for that one sample's transforms. Skipping the first batches of an epoch (a resume) is
then exact without producing them.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

SeededIndex = Tuple[int, int]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 64-bit seed for one sample's augmentation in one epoch (NumPy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0])


class SeededSamples(Sampler[SeededIndex]):
    """The indices of `order` (a shuffling or distributed sampler), each with its `sample_seed`.

    The training loop calls `set_epoch` before every epoch; iterated on its own, the sampler counts epochs itself
    (0, 1, ...), so no two epochs repeat their draws. `skip_next` drops the first samples of the next epoch.
    """

    def __init__(self, order: Sampler[int], seed: int) -> None:
        self.order = order
        self.seed = seed
        self.epoch = 0
        self._skip = 0

    @property
    def generator(self) -> Optional[torch.Generator]:
        """The generator that draws the epoch's order (None when the order is a DistributedSampler's)."""
        return getattr(self.order, "generator", None)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.order, "set_epoch"):
            self.order.set_epoch(epoch)

    def skip_next(self, samples: int) -> None:
        """Leave out the first `samples` indices of the next epoch (already trained before a resume)."""
        self._skip = samples

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[SeededIndex]:
        epoch, skip = self.epoch, self._skip
        self.epoch, self._skip = epoch + 1, 0
        for position, index in enumerate(self.order):
            if position >= skip:
                yield index, sample_seed(self.seed, epoch, index)


class SeededDataset(Dataset):
    """`dataset` indexed by (index, seed): the CPU generator that torchvision's transforms draw from is seeded for
    the one sample. In the training process (a loader without workers) its state is restored afterwards, so the
    training's own RNG stream is left exactly as it was; the CUDA generators are never touched (dropout on the GPU
    keeps its stream)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: SeededIndex) -> Any:
        index, seed = item
        generator = torch.default_generator
        if get_worker_info() is not None:  # a worker process: its generator serves nothing else
            generator.manual_seed(seed)
            return self.dataset[index]
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            generator.set_state(state)
