"""Data sets for the comparison harness, held in memory as uint8 tensors.

``load(name, root)`` reads digits (embedded in scikit-learn), MNIST (IDX files), CIFAR-10
(python batches, an image folder, or its tar archive) or makes synthetic data;
``batches(...)`` yields normalised, optionally augmented and sharded mini-batches.
"""

from .batches import batches, num_batches
from .dataset import Dataset, Split
from .errors import DatasetError, DatasetNotFoundError
from .registry import DATASETS, ROOT_LAYOUTS, load, origin

__all__ = [
    "DATASETS",
    "ROOT_LAYOUTS",
    "Dataset",
    "DatasetError",
    "DatasetNotFoundError",
    "Split",
    "batches",
    "load",
    "num_batches",
    "origin",
]
