"""Datasets and the mini-batches fed to training and evaluation (see `loaders`)."""

from pipeline.data.batches import TensorBatches
from pipeline.data.digits import materialize_digits
from pipeline.data.loaders import available_datasets, build_loaders
from pipeline.data.spec import Batches, DatasetInfo, Loaders
from pipeline.data.torchvision_sets import (CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN, IMAGENET_STD, MNIST_MEAN,
                                            MNIST_STD)

__all__ = ["CIFAR100_MEAN", "CIFAR100_STD", "IMAGENET_MEAN", "IMAGENET_STD", "MNIST_MEAN", "MNIST_STD", "Batches",
           "DatasetInfo", "Loaders", "TensorBatches", "available_datasets", "build_loaders", "materialize_digits"]
