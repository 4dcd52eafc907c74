"""Datasets and the mini-batches fed to training and evaluation (see `loaders`)."""

from pipeline.data.loaders import (CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN, IMAGENET_STD, MNIST_MEAN, MNIST_STD,
                                   Batches, DatasetInfo, Loaders, TensorBatches, available_datasets, build_loaders,
                                   materialize_digits)

__all__ = ["CIFAR100_MEAN", "CIFAR100_STD", "IMAGENET_MEAN", "IMAGENET_STD", "MNIST_MEAN", "MNIST_STD", "Batches",
           "DatasetInfo", "Loaders", "TensorBatches", "available_datasets", "build_loaders", "materialize_digits"]
