"""Image-folder data sets: ``train/<class>/<image>`` and ``test/<class>/<image>``, read from a
directory or straight from a tar archive (``.tar``, ``.tar.gz``, ...) without unpacking it.

Images are decoded with Pillow and converted to RGB. Classes are numbered in sorted name
order; within a class, images are ordered by file name.
"""

from __future__ import annotations

import io
import os
import tarfile
import zlib
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np

from .errors import DatasetError, DatasetNotFoundError

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LAYOUT = (
    "train/<class>/<image> and test/<class>/<image> (.jpg, .jpeg or .png images, all of one square size; "
    "the same class directories under train/ and test/)"
)


class Entry(NamedTuple):
    """One item found in an image folder: an image, or (``image`` None) a class directory."""

    split: str
    cls: str
    name: str  # path inside the folder or archive, for messages and ordering
    image: np.ndarray | None  # uint8 (H, W, 3)


def read_directory(root: Path) -> dict[str, np.ndarray]:
    """The images under ``root/train`` and ``root/test``; see ``assemble`` for the arrays returned."""
    for split in SPLITS:
        if not (root / split).is_dir():
            raise DatasetNotFoundError(f"{root / split} is missing; expected {root} to hold {LAYOUT}")
    return assemble(_directory_entries(root), str(root))


def read_tar(path: Path) -> dict[str, np.ndarray]:
    """The images in the tar archive ``path``, in one sequential pass; see ``assemble``."""
    return assemble(tar_entries(path), str(path))


def image_folder_files(root: Path) -> list[str]:
    """Every file under ``root/train`` and ``root/test`` (for the cache signature)."""
    files = []
    for split in SPLITS:
        for folder, _, names in os.walk(os.path.join(root, split)):
            files += [os.path.join(folder, name) for name in names]
    return files


def tar_entries(path: Path) -> Iterator[Entry]:
    """Entries of the tar archive ``path``, decoded as they are read.

    The layout may sit at the archive's root or inside one top-level directory. Files outside
    ``train/`` and ``test/`` (a README) are skipped.
    """
    prefixes = set()  # top-level directories holding the layout ("" for the archive's root)
    try:
        with tarfile.open(path, "r|*") as archive:
            for member in archive:
                prefix, parts = split_prefix(member.name)
                where = f"{path}: {member.name}"
                entry = _place(parts, is_dir=member.isdir(), where=where)
                if entry is None:
                    continue
                prefixes.add(prefix)
                if len(prefixes) > 1:
                    raise DatasetError(
                        f"{where}: the layout appears under several top-level directories {sorted(prefixes)}; "
                        f"expected {LAYOUT} once, at the archive's root or inside one directory"
                    )
                if entry.name:
                    if not member.isfile():
                        raise DatasetError(f"{where} is a link or special file; expected a regular image file")
                    entry = entry._replace(image=decode(archive.extractfile(member).read(), where))
                yield entry
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        # A cut-off or damaged archive surfaces as any of these, depending on where it breaks.
        raise DatasetError(f"{path}: cannot read the tar archive ({err}); expected it to hold {LAYOUT}") from err


def split_prefix(member_name: str) -> tuple[str, tuple[str, ...]]:
    """(top-level directory or "", the rest of the path's parts) for a tar member's name."""
    parts = PurePosixPath(member_name).parts
    if len(parts) > 1 and parts[0] not in SPLITS:
        return parts[0], parts[1:]
    return "", parts


def is_layout_image(parts: tuple[str, ...]) -> bool:
    """Whether the relative path ``parts`` is an image at ``<split>/<class>/<file>``."""
    return (
        len(parts) == 3
        and parts[0] in SPLITS
        and not any(part.startswith(".") for part in parts)
        and PurePosixPath(parts[-1]).suffix.lower() in IMAGE_SUFFIXES
    )


def decode(data: bytes, where: str) -> np.ndarray:
    """The image in ``data`` (any format Pillow reads) as uint8 RGB (H, W, 3)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            # convert() returns a loaded copy; asarray() of an RGB image loads it in place.
            return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"{where}: cannot decode the image ({err}); expected a .jpg, .jpeg or .png image") from err


def assemble(entries: Iterable[Entry], source: str) -> dict[str, np.ndarray]:
    """Stacks the entries into arrays.

    Returns ``train_images``, ``test_images``: uint8 (N, 3, H, W); ``train_labels``,
    ``test_labels``: int64 (N,); ``classes``: str (K,), sorted.
    """
    classes: dict[str, set[str]] = {split: set() for split in SPLITS}
    images: dict[tuple[str, str], list[tuple[str, np.ndarray]]] = defaultdict(list)
    for entry in entries:
        classes[entry.split].add(entry.cls)
        if entry.image is not None:
            images[entry.split, entry.cls].append((entry.name, entry.image))
    for split in SPLITS:
        if not classes[split]:
            raise DatasetError(f"{source}: no {split}/<class>/ directory; expected {LAYOUT}")
    if classes["train"] != classes["test"]:
        raise DatasetError(
            f"{source}: train and test classes differ (only in train: {sorted(classes['train'] - classes['test'])}, "
            f"only in test: {sorted(classes['test'] - classes['train'])}); expected {LAYOUT}"
        )
    names = sorted(classes["train"])
    for split in SPLITS:
        for cls in names:
            if not images[split, cls]:
                raise DatasetError(f"{source}: {split}/{cls}/ holds no images; expected {LAYOUT}")
    first_name, first = images["train", names[0]][0]
    if first.shape[0] != first.shape[1]:
        raise DatasetError(
            f"{source}: {first_name} is {first.shape[1]}x{first.shape[0]} pixels; expected square images"
        )
    arrays: dict[str, np.ndarray] = {"classes": np.array(names)}
    for split in SPLITS:
        stacked, labels = [], []
        for label, cls in enumerate(names):
            found = sorted(images[split, cls], key=lambda item: item[0])
            for name, image in found:
                if image.shape != first.shape:
                    raise DatasetError(
                        f"{source}: {name} is {image.shape[1]}x{image.shape[0]} pixels but {first_name} is "
                        f"{first.shape[1]}x{first.shape[0]}; expected all images of one size"
                    )
                stacked.append(image)
            labels += [label] * len(found)
        arrays[f"{split}_images"] = np.ascontiguousarray(np.stack(stacked).transpose(0, 3, 1, 2))
        arrays[f"{split}_labels"] = np.array(labels, dtype=np.int64)
    return arrays


def _directory_entries(root: Path) -> Iterator[Entry]:
    for split in SPLITS:
        for folder, dirs, files in os.walk(root / split):
            dirs.sort()
            parts = Path(folder).relative_to(root).parts
            for name in [*dirs, *sorted(files)]:
                path = Path(folder, name)
                entry = _place((*parts, name), is_dir=name in dirs, where=str(path))
                if entry is not None and entry.name:
                    entry = entry._replace(image=decode(path.read_bytes(), str(path)))
                if entry is not None:
                    yield entry


def _place(parts: tuple[str, ...], is_dir: bool, where: str) -> Entry | None:
    """Where ``parts`` (a path relative to the folder's root) belongs in the layout.

    An Entry without image for a class directory or an image file (to be decoded), None for
    things the layout ignores; raises for things that break it.
    """
    if not parts or parts[0] not in SPLITS or any(part.startswith(".") for part in parts):
        return None  # files beside the layout (README), hidden files
    if len(parts) == 2:
        if is_dir:
            return Entry(parts[0], parts[1], "", None)
        if PurePosixPath(parts[-1]).suffix.lower() in IMAGE_SUFFIXES:
            raise DatasetError(f"{where} lies outside a class directory; expected {LAYOUT}")
        return None
    if not is_dir and is_layout_image(parts):
        return Entry(parts[0], parts[1], "/".join(parts), None)
    if len(parts) >= 3:
        raise DatasetError(f"{where} is not a .jpg, .jpeg or .png image in a class directory; expected {LAYOUT}")
    return None
