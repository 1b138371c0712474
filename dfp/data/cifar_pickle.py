"""Reader for CIFAR-10's "python version": the pickled batches of cifar-10-batches-py/."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from .errors import DatasetError, DatasetNotFoundError

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
IMAGE_SHAPE = (3, 32, 32)
LAYOUT = (
    "the CIFAR-10 python batches: data_batch_1 .. data_batch_5, test_batch (pickled dicts with 'data': "
    "uint8 N x 3072 in channel-major RGB order, 'labels': N ints 0..9) and batches.meta ('label_names')"
)

# The only globals a CIFAR batch needs: numpy arrays and Python 2 byte strings. Anything else
# could run arbitrary code while unpickling, so it is refused.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


def is_pickle_directory(root: Path) -> bool:
    return any((root / name).exists() for name in (*TRAIN_BATCHES, TEST_BATCH, META))


def read_pickle_batches(root: Path) -> dict[str, np.ndarray]:
    """Returns ``train_images``, ``test_images``: uint8 (N, 3, 32, 32); ``train_labels``,
    ``test_labels``: int64 (N,); ``classes``: str (10,)."""
    meta = _load(root / META)
    names = _field(meta, "label_names", root / META)
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    arrays = {"classes": np.array(classes)}
    for split, batches in (("train", TRAIN_BATCHES), ("test", (TEST_BATCH,))):
        parts = [_read_batch(root / name, len(classes)) for name in batches]
        arrays[f"{split}_images"] = np.concatenate([images for images, _ in parts])
        arrays[f"{split}_labels"] = np.concatenate([labels for _, labels in parts])
    return arrays


def _read_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _load(path)
    data = np.asarray(_field(batch, "data", path))
    labels = np.asarray(_field(batch, "labels", path))
    row = int(np.prod(IMAGE_SHAPE))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != row:
        raise DatasetError(f"{path}: 'data' is {data.dtype} {data.shape}; expected uint8 (N, {row}); {LAYOUT}")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(
            f"{path}: 'labels' holds {labels.shape} {labels.dtype} for {len(data)} images; expected one int per image"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{path}: labels span {labels.min()}..{labels.max()}; expected 0..{num_classes - 1}")
    return data.reshape(-1, *IMAGE_SHAPE), labels.astype(np.int64)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refused to load {module}.{name} (a CIFAR batch holds only numpy arrays)")
        return super().find_class(module, name)


def _load(path: Path) -> dict:
    if not path.is_file():
        raise DatasetNotFoundError(f"{path} is missing; expected {path.parent} to hold {LAYOUT}")
    try:
        with path.open("rb") as f:
            # encoding="bytes": the batches were pickled by Python 2, whose str are bytes.
            obj = _RestrictedUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise DatasetError(f"{path}: not a readable CIFAR batch ({err}); expected {LAYOUT}") from err
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: holds a {type(obj).__name__}, expected a dict; {LAYOUT}")
    return obj


def _field(batch: dict, key: str, path: Path):
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    raise DatasetError(f"{path}: no '{key}' entry; expected {LAYOUT}")
