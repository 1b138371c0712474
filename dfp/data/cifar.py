"""CIFAR-10 (60,000 colour images 32x32, 10 classes) from a local copy, in any of three layouts:

- the python pickle batches (``cifar-10-batches-py/``, or the directory above it);
- an image folder ``train/<class>/*.jpg|png``, ``test/<class>/*.jpg|png``;
- a tar archive (``.tar.gz``, ...) of that image folder, read without unpacking it.

Nothing is downloaded.
"""

from __future__ import annotations

import os
import tarfile
import zlib
from pathlib import Path, PurePosixPath

import torch

from . import cifar_pickle, image_folder
from .cache import cached_arrays
from .dataset import Dataset, Split
from .errors import DatasetError, DatasetNotFoundError

PICKLE_DIRECTORY = "cifar-10-batches-py"
LAYOUTS = (
    f"a directory of CIFAR-10 python batches ({PICKLE_DIRECTORY}/ or its parent), an image folder "
    f"({image_folder.LAYOUT}), or a tar archive of such an image folder"
)


def load_cifar10(root: Path, *, cache_dir: str | os.PathLike | None = None) -> Dataset:
    """CIFAR-10 as uint8 images (N, 3, S, S) and labels, from ``root`` in any layout above:
    S = 32 for CIFAR-10 itself; an image folder of other square images, all of one size,
    loads too.

    cache_dir: where decoded image folders are cached (see ``dfp.data.cache``); None, no cache.
    Pickle batches are read directly: they need no decoding.
    """
    layout = detect_layout(root)
    if layout == "pickle":
        pickle_root = root / PICKLE_DIRECTORY if (root / PICKLE_DIRECTORY).is_dir() else root
        arrays = cifar_pickle.read_pickle_batches(pickle_root)
    else:
        cache = None if cache_dir is None else Path(cache_dir).expanduser()
        if layout == "image-folder":
            files, read = (lambda: image_folder.image_folder_files(root)), (lambda: image_folder.read_directory(root))
        else:
            files, read = (lambda: [str(root)]), (lambda: image_folder.read_tar(root))
        arrays = cached_arrays(cache, "cifar10", root, files, read)
    train = Split(torch.from_numpy(arrays["train_images"]), torch.from_numpy(arrays["train_labels"]))
    test = Split(torch.from_numpy(arrays["test_images"]), torch.from_numpy(arrays["test_labels"]))
    return Dataset.from_splits("cifar10", train, test, tuple(str(c) for c in arrays["classes"]))


def detect_layout(root: Path) -> str:
    """Which layout ``root`` holds: "pickle", "image-folder" or "image-folder-tar" (cheap: reads no image)."""
    if not root.exists():
        raise DatasetNotFoundError(f"CIFAR-10 path {root} does not exist; expected {LAYOUTS}")
    if root.is_file():
        return _tar_layout(root)
    if cifar_pickle.is_pickle_directory(root) or (root / PICKLE_DIRECTORY).is_dir():
        return "pickle"
    if any((root / split).is_dir() for split in image_folder.SPLITS):
        return "image-folder"
    raise DatasetError(f"{root} holds neither CIFAR-10 python batches nor train/ and test/ folders; expected {LAYOUTS}")


def _tar_layout(path: Path) -> str:
    """Reads the archive's members up to its first image of the layout; decodes nothing."""
    pickle_names = {*cifar_pickle.TRAIN_BATCHES, cifar_pickle.TEST_BATCH, cifar_pickle.META}
    try:
        with tarfile.open(path, "r|*") as archive:
            for member in archive:
                if PurePosixPath(member.name).name in pickle_names:
                    raise DatasetError(
                        f"{path} holds the CIFAR-10 python batches ({member.name}); unpack it "
                        f"(tar -xzf {path.name}) and pass the {PICKLE_DIRECTORY} directory"
                    )
                if member.isfile() and image_folder.is_layout_image(image_folder.split_prefix(member.name)[1]):
                    return "image-folder-tar"
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise DatasetError(f"{path}: not a readable tar archive ({err}); expected {LAYOUTS}") from err
    raise DatasetError(f"{path}: a tar archive without any train/<class>/<image> or test/...; expected {LAYOUTS}")
