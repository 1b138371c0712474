"""MNIST from a local directory of the four original IDX files (60,000 train and 10,000 test
images, 28x28 grey, 10 classes). Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .dataset import Dataset, Split
from .errors import DatasetError, DatasetNotFoundError
from .idx import read_idx

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASSES = tuple(str(d) for d in range(10))
LAYOUT = (
    "a directory holding train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
    "t10k-labels-idx1-ubyte, each raw or gzip-compressed (name + '.gz'), in the IDX format of "
    "http://yann.lecun.com/exdb/mnist/ (images: N x rows x cols unsigned bytes; labels: N bytes 0..9)"
)


def load_mnist(root: Path) -> Dataset:
    """MNIST as uint8 images (N, 1, 28, 28) and labels 0..9, in the files' order.

    Where both ``name`` and ``name.gz`` exist, the uncompressed file is read. The content is
    checked (magic numbers, dimensions, sizes, label range, counts); the compressed files'
    hashes are not, since re-compressing a file changes them without changing the data.
    """
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise DatasetNotFoundError(f"MNIST directory {root} {what}; expected {LAYOUT}")
    splits = {}
    for part, (images_name, labels_name) in FILES.items():
        images_path, labels_path = _find(root, images_name), _find(root, labels_name)
        images = read_idx(images_path, 3, LAYOUT)
        labels = read_idx(labels_path, 1, LAYOUT)
        if images.shape[1] != images.shape[2]:
            raise DatasetError(f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, expected square")
        if len(images) != len(labels):
            raise DatasetError(
                f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels; "
                f"expected one label per image"
            )
        if len(labels) and labels.max() >= len(CLASSES):
            raise DatasetError(f"{labels_path}: label {labels.max()} out of range; expected labels 0..9")
        splits[part] = Split(torch.from_numpy(images[:, None]), torch.from_numpy(labels.astype(np.int64)))
    train_size, test_size = splits["train"].images.shape[2], splits["test"].images.shape[2]
    if train_size != test_size:
        raise DatasetError(
            f"{root}: train images are {train_size}x{train_size} but test images are {test_size}x{test_size}"
        )
    return Dataset.from_splits("mnist", splits["train"], splits["test"], CLASSES)


def _find(root: Path, name: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetNotFoundError(f"MNIST file {root / name} (or {name}.gz) is missing; expected {LAYOUT}")
