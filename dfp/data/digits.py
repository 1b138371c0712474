"""scikit-learn's handwritten digits (UCI optdigits test part): 1,797 images 8x8, 10 classes.

The data ship inside scikit-learn, so this set needs no file and no download. The split is
fixed: stratified by class, 20 % test, ``random_state=0`` (1,437 train, 360 test images).
"""

from __future__ import annotations

import numpy as np
import torch

from .dataset import Dataset, Split

TEST_FRACTION = 0.2
SPLIT_SEED = 0


def load_digits() -> Dataset:
    """The digits as uint8 (N, 1, 8, 8) images.

    scikit-learn gives integer intensities 0..16; they become ``(v * 255 + 8) // 16``, that is
    ``v * 255 / 16`` rounded half up in exact integer arithmetic: 0 -> 0, 8 -> 128, 16 -> 255.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    levels = bunch.images.astype(np.int64)  # 0..16, stored as float64 by scikit-learn
    images = ((levels * 255 + 8) // 16).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    classes = tuple(str(c) for c in bunch.target_names)
    return Dataset.from_splits(
        "digits",
        Split(torch.from_numpy(train_x), torch.from_numpy(train_y)),
        Split(torch.from_numpy(test_x), torch.from_numpy(test_y)),
        classes,
    )
