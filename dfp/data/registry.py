"""``load(name, root, **options)``: one entry point for every data set."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

from .cifar import LAYOUTS as CIFAR_LAYOUTS
from .cifar import load_cifar10
from .dataset import Dataset
from .digits import load_digits
from .errors import DatasetError
from .mnist import LAYOUT as MNIST_LAYOUT
from .mnist import load_mnist
from .synthetic import load_synthetic

_LOADERS = {"digits": load_digits, "mnist": load_mnist, "cifar10": load_cifar10, "synthetic": load_synthetic}
# Data sets read from a local copy, and what that copy must hold.
ROOT_LAYOUTS: dict[str, str] = {"mnist": MNIST_LAYOUT, "cifar10": CIFAR_LAYOUTS}
DATASETS: tuple[str, ...] = tuple(_LOADERS)


def load(name: str, root: str | os.PathLike | None = None, **options) -> Dataset:
    """The data set ``name`` in memory.

    name: "digits" (embedded in scikit-learn, no root), "mnist" and "cifar10" (root: the local
    copy; nothing is downloaded), "synthetic" (generated, no root).
    options: "cifar10": ``cache_dir``; "synthetic": ``channels``, ``image_size``,
    ``num_classes``, ``train_size``, ``test_size``, ``seed``.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    loader = _LOADERS[name]
    accepted = [p.name for p in inspect.signature(loader).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(f"load({name!r}) takes no option {', '.join(unknown)}; its options: {accepted or 'none'}")
    if name not in ROOT_LAYOUTS:
        if root is not None:
            raise DatasetError(f"load({name!r}) takes no root: the data are {origin(name)}")
        return loader(**options)
    if root is None:
        raise DatasetError(
            f"load({name!r}) needs root=<path> of a local copy: {ROOT_LAYOUTS[name]}. "
            f"dfp downloads nothing; fetch the files yourself and pass where they lie."
        )
    return loader(Path(root).expanduser(), **options)


def origin(name: str) -> str:
    """Where the data of a set without a local copy (not in ROOT_LAYOUTS) come from."""
    return "embedded in scikit-learn" if name == "digits" else "generated"
