"""Writers of small data set files in every format dfp.data reads, for the tests."""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

MNIST_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes holding ``array``."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(root: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], gz: bool) -> dict[str, Path]:
    """Writes the four IDX files (``.gz`` when ``gz``); returns their paths by short name."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for part, (images, labels) in splits.items():
        for name, array in zip(MNIST_NAMES[part], (images, labels)):
            data = idx_bytes(array)
            path = root / (name + ".gz" if gz else name)
            path.write_bytes(gzip.compress(data) if gz else data)
            paths[name] = path
    return paths


def random_images(n: int, channels: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, channels, size, size), dtype=np.uint8)


def write_cifar_pickles(
    root: Path, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], classes: list[str]
) -> None:
    """The python batches as CIFAR-10 ships them (bytes keys, data N x 3072), train split in 5 batches."""
    root.mkdir(parents=True, exist_ok=True)
    images, labels = train
    for i, (part_x, part_y) in enumerate(zip(np.array_split(images, 5), np.array_split(labels, 5)), start=1):
        _pickle(root / f"data_batch_{i}", part_x, part_y)
    _pickle(root / "test_batch", *test)
    with (root / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in classes], b"num_vis": 3072}, f, protocol=2)


def _pickle(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    with path.open("wb") as f:
        batch = {b"data": images.reshape(len(images), -1), b"labels": [int(v) for v in labels]}
        pickle.dump(batch, f, protocol=2)


def smooth_images(n: int, size: int, seed: int) -> np.ndarray:
    """uint8 (n, size, size, 3) colour gradients, which JPEG keeps within a few levels."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.0, 1.0, size)
    out = []
    for _ in range(n):
        low, high = rng.uniform(20, 100, 3), rng.uniform(150, 235, 3)
        mix = (ramp[:, None, None] + ramp[None, :, None]) / 2
        out.append((low + (high - low) * mix).round().astype(np.uint8))
    return np.stack(out)


def write_image_folder(root: Path, content: dict[str, dict[str, np.ndarray]], suffix: str) -> None:
    """content[split][class]: uint8 (n, H, W, 3) images, written as 000.<suffix>, 001.<suffix>, ..."""
    for split, by_class in content.items():
        for cls, images in by_class.items():
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                Image.fromarray(image).save(folder / f"{i:03d}{suffix}", quality=95)


def tar_folder(folder: Path, archive: Path, prefix: str = "") -> None:
    """A .tar.gz of ``folder``'s content, its paths starting with ``prefix`` ("" for none)."""
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            tar.add(path, arcname=str(Path(prefix) / path.relative_to(folder)), recursive=False)


def write_tar(archive: Path, members: dict[str, bytes]) -> None:
    """A .tar.gz holding exactly ``members`` (name -> content)."""
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
