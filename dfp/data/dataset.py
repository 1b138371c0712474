"""The in-memory form of a data set: uint8 images and int64 labels, split into train and test."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import DatasetError


@dataclass(frozen=True, eq=False)
class Split:
    """One part (train or test) of a data set.

    images: uint8 (N, C, H, W), pixel values 0..255.
    labels: int64 (N,), class indices into ``Dataset.classes``.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DatasetError(
                f"Split.images must be a uint8 tensor (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise DatasetError(
                f"Split.labels must be an int64 tensor (N,), got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if self.images.shape[0] != self.labels.shape[0]:
            raise DatasetError(f"Split has {self.images.shape[0]} images but {self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __repr__(self) -> str:
        return f"Split(images=uint8{list(self.images.shape)}, labels=int64{list(self.labels.shape)})"


@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification data set held in memory.

    mean, std: per channel, of the train images scaled to [0, 1] (population std over all
    pixels); ``batches`` normalises with them.
    """

    name: str
    train: Split
    test: Split
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        shape, test_shape = tuple(self.train.images.shape[1:]), tuple(self.test.images.shape[1:])
        if shape != test_shape:
            raise DatasetError(f"{self.name}: train images are {shape} (C, H, W) but test images are {test_shape}")
        if shape[1] != shape[2]:
            raise DatasetError(f"{self.name}: images must be square, got H={shape[1]}, W={shape[2]}")
        if not self.classes:
            raise DatasetError(f"{self.name}: no classes")
        for part, split in (("train", self.train), ("test", self.test)):
            if len(split) and (split.labels.min() < 0 or split.labels.max() >= len(self.classes)):
                raise DatasetError(
                    f"{self.name}: {part} labels must lie in 0..{len(self.classes) - 1} "
                    f"(one per class), found {int(split.labels.min())}..{int(split.labels.max())}"
                )
        if len(self.mean) != shape[0] or len(self.std) != shape[0]:
            raise DatasetError(f"{self.name}: mean and std need one value per channel ({shape[0]})")
        if not all(s > 0 for s in self.std):
            # A constant channel would make normalisation divide by zero.
            raise DatasetError(f"{self.name}: every channel's std must be positive, got {self.std}")

    @classmethod
    def from_splits(cls, name: str, train: Split, test: Split, classes: tuple[str, ...]) -> Dataset:
        """Builds the data set, with mean and std measured on ``train``."""
        mean, std = channel_stats(train.images)
        return cls(name=name, train=train, test=test, classes=tuple(classes), mean=mean, std=std)

    @property
    def channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:
        """Height (= width) of the images, in pixels."""
        return self.train.images.shape[2]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and population std per channel of uint8 images (N, C, H, W), scaled to [0, 1].

    Computed from each channel's histogram of the 256 levels, so the sums are exact integers
    and the variance suffers no cancellation.
    """
    if images.shape[0] == 0:
        raise DatasetError("cannot measure mean and std of an empty train split")
    levels = torch.arange(256, dtype=torch.int64)
    count = images[:, 0].numel()
    mean, std = [], []
    for c in range(images.shape[1]):
        histogram = torch.bincount(images[:, c].flatten(), minlength=256)
        total, squares = int((histogram * levels).sum()), int((histogram * levels * levels).sum())
        mean.append(total / (count * 255))
        std.append(math.sqrt(count * squares - total * total) / (count * 255))
    return tuple(mean), tuple(std)
