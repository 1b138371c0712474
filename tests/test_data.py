"""dfp.data: every file format round trips on small files written here, bad files give errors
that name them, and batches shuffle, shard, augment and normalise as documented."""

from __future__ import annotations

import gzip
import itertools
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from data_files import (
    random_images,
    smooth_images,
    tar_folder,
    write_cifar_pickles,
    write_image_folder,
    write_mnist,
    write_tar,
)

from dfp import data
from dfp.data import cache, cifar, image_folder
from dfp.data.dataset import channel_stats

SHARED = Path(os.environ.get("DFP_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.fixture(autouse=True)
def _one_thread():
    """The batches here are tiny: more threads only contend (conftest restores the count)."""
    torch.set_num_threads(1)


def _raises_naming(path, match=None, error=data.DatasetError):
    """pytest.raises for an error whose message names ``path``."""
    return pytest.raises(error, match=f"{re.escape(str(path))}.*{match or ''}")


# ---------------------------------------------------------------- Split, Dataset, statistics


def test_split_rejects_wrong_types_and_counts():
    with pytest.raises(data.DatasetError, match="uint8"):
        data.Split(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(data.DatasetError, match="int64"):
        data.Split(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(data.DatasetError, match="2 images but 3 labels"):
        data.Split(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))


def test_dataset_rejects_labels_outside_the_classes():
    images = torch.from_numpy(random_images(4, 1, 4, seed=0))
    split = data.Split(images, torch.tensor([0, 1, 2, 1]))
    with pytest.raises(data.DatasetError, match="labels must lie in 0..1"):
        data.Dataset.from_splits("toy", split, split, ("a", "b"))


def test_channel_stats_are_exact():
    images = torch.from_numpy(random_images(50, 3, 7, seed=1))
    mean, std = channel_stats(images)
    scaled = images.double() / 255
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), scaled.mean(dim=(0, 2, 3)), rtol=1e-14, atol=0)
    expected_std = scaled.std(dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), expected_std, rtol=1e-12, atol=0)


# ---------------------------------------------------------------- load(): names, roots, options


def test_load_needs_a_root_for_file_datasets():
    for name in ("mnist", "cifar10"):
        with pytest.raises(data.DatasetError, match="needs root=.*downloads nothing"):
            data.load(name)


def test_load_rejects_unknown_names_options_and_needless_roots(tmp_path):
    with pytest.raises(ValueError, match="unknown data set 'imagenet'"):
        data.load("imagenet")
    with pytest.raises(TypeError, match="no option cache_dir"):
        data.load("digits", cache_dir=tmp_path)
    with pytest.raises(data.DatasetError, match="takes no root"):
        data.load("synthetic", root=tmp_path)


# ---------------------------------------------------------------- digits


def test_digits_split_is_fixed_stratified_and_scaled():
    first, second = data.load("digits"), data.load("digits")
    assert (len(first.train), len(first.test)) == (1437, 360)
    assert first.train.images.shape[1:] == (1, 8, 8) and first.train.images.dtype == torch.uint8
    assert first.classes == tuple(str(d) for d in range(10))
    assert torch.equal(first.train.images, second.train.images) and torch.equal(first.test.labels, second.test.labels)
    # Stratified: every class has 20 % of its images in test (rounded).
    from sklearn.datasets import load_digits

    all_labels = torch.from_numpy(load_digits().target)
    per_class, in_test = torch.bincount(all_labels), torch.bincount(first.test.labels)
    assert torch.all((in_test - per_class * 0.2).abs() <= 1)
    # The 17 levels 0..16 become round(v * 255 / 16), steps of 15.9375: 0, 16, ..., 112, 128, 143, ..., 239, 255.
    levels = torch.unique(torch.cat([first.train.images.flatten(), first.test.images.flatten()]))
    assert levels.tolist() == [(v * 255 + 8) // 16 for v in range(17)]


# ---------------------------------------------------------------- MNIST (IDX)


def _mnist_arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "train": (rng.integers(0, 256, (7, 28, 28), dtype=np.uint8), rng.integers(0, 10, 7, dtype=np.uint8)),
        "test": (rng.integers(0, 256, (3, 28, 28), dtype=np.uint8), rng.integers(0, 10, 3, dtype=np.uint8)),
    }


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_mnist_round_trip(tmp_path, gz):
    arrays = _mnist_arrays()
    write_mnist(tmp_path, arrays, gz=gz)
    dataset = data.load("mnist", str(tmp_path))
    for part, split in (("train", dataset.train), ("test", dataset.test)):
        images, labels = arrays[part]
        assert torch.equal(split.images, torch.from_numpy(images)[:, None])
        assert torch.equal(split.labels, torch.from_numpy(labels.astype(np.int64)))
    assert dataset.channels == 1 and dataset.image_size == 28 and dataset.num_classes == 10


def test_mnist_missing_directory_and_file(tmp_path):
    with _raises_naming(tmp_path / "nowhere", "does not exist", data.DatasetNotFoundError):
        data.load("mnist", tmp_path / "nowhere")
    paths = write_mnist(tmp_path, _mnist_arrays(), gz=True)
    paths["t10k-labels-idx1-ubyte"].unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.*missing.*expected a directory holding"):
        data.load("mnist", tmp_path)


def _corrupt(path: Path, gz: bool, change) -> None:
    raw = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    raw = change(raw)
    path.write_bytes(gzip.compress(raw) if gz else raw)


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("train-images-idx3-ubyte", lambda b: b"\x00\x00\x08\x01" + b[4:], "bad IDX magic number 0x00000801"),
        ("train-labels-idx1-ubyte", lambda b: b[:-1], "truncated"),
        ("t10k-images-idx3-ubyte", lambda b: b + b"\x00", "trailing bytes"),
        ("t10k-images-idx3-ubyte", lambda b: b[:10], "truncated"),
    ],
    ids=["magic", "short-labels", "trailing", "short-header"],
)
def test_mnist_corrupt_file_is_named(tmp_path, gz, name, change, message):
    paths = write_mnist(tmp_path, _mnist_arrays(), gz=gz)
    _corrupt(paths[name], gz, change)
    with _raises_naming(paths[name], message):
        data.load("mnist", tmp_path)


def test_mnist_cut_gzip_stream_is_named(tmp_path):
    paths = write_mnist(tmp_path, _mnist_arrays(), gz=True)
    path = paths["train-images-idx3-ubyte"]
    path.write_bytes(path.read_bytes()[:-20])
    with _raises_naming(path, "cannot read"):
        data.load("mnist", tmp_path)


def test_mnist_count_mismatch_and_label_range(tmp_path):
    arrays = _mnist_arrays()
    images, labels = arrays["train"]
    write_mnist(tmp_path, {**arrays, "train": (images, labels[:-1])}, gz=False)
    with pytest.raises(data.DatasetError, match="7 images but .*train-labels-idx1-ubyte holds 6 labels"):
        data.load("mnist", tmp_path)
    write_mnist(tmp_path, {**arrays, "train": (images, np.full(7, 10, np.uint8))}, gz=False)
    with _raises_naming(tmp_path / "train-labels-idx1-ubyte", "label 10 out of range"):
        data.load("mnist", tmp_path)


# ---------------------------------------------------------------- CIFAR-10 python batches


def _cifar_arrays(n_train=10, n_test=4):
    rng = np.random.default_rng(3)
    train = (random_images(n_train, 3, 32, seed=4), rng.integers(0, 10, n_train))
    test = (random_images(n_test, 3, 32, seed=5), rng.integers(0, 10, n_test))
    return train, test


@pytest.mark.parametrize("parent", [False, True], ids=["batches-dir", "parent-dir"])
def test_cifar_pickle_round_trip(tmp_path, parent):
    train, test = _cifar_arrays()
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_pickles(folder, train, test, list(CIFAR_CLASSES))
    dataset = data.load("cifar10", tmp_path if parent else folder)
    assert dataset.classes == CIFAR_CLASSES
    for split, (images, labels) in ((dataset.train, train), (dataset.test, test)):
        assert torch.equal(split.images, torch.from_numpy(images))
        assert torch.equal(split.labels, torch.from_numpy(labels.astype(np.int64)))


def test_cifar_pickle_missing_and_corrupt_batches(tmp_path):
    train, test = _cifar_arrays()
    write_cifar_pickles(tmp_path, train, test, list(CIFAR_CLASSES))
    batch = tmp_path / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:200])
    with _raises_naming(batch, "not a readable CIFAR batch"):
        data.load("cifar10", tmp_path)
    batch.unlink()
    with _raises_naming(batch, "missing", data.DatasetNotFoundError):
        data.load("cifar10", tmp_path)


def test_cifar_pickle_wrong_shape_and_labels(tmp_path):
    train, test = _cifar_arrays()
    write_cifar_pickles(tmp_path, train, test, list(CIFAR_CLASSES))
    with (tmp_path / "test_batch").open("wb") as f:
        pickle.dump({b"data": np.zeros((4, 1024), np.uint8), b"labels": [0] * 4}, f, protocol=2)
    with _raises_naming(tmp_path / "test_batch", r"expected uint8 \(N, 3072\)"):
        data.load("cifar10", tmp_path)
    with (tmp_path / "test_batch").open("wb") as f:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]}, f, protocol=2)
    with _raises_naming(tmp_path / "test_batch", r"labels span 0..10; expected 0..9"):
        data.load("cifar10", tmp_path)


class _Payload:
    """Unpickling this would create a directory: a stand-in for arbitrary code."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (str(self.target),)


def test_cifar_pickle_refuses_code(tmp_path):
    train, test = _cifar_arrays()
    write_cifar_pickles(tmp_path, train, test, list(CIFAR_CLASSES))
    target = tmp_path / "created-by-pickle"
    with (tmp_path / "batches.meta").open("wb") as f:
        pickle.dump({b"label_names": _Payload(target)}, f, protocol=2)
    with _raises_naming(tmp_path / "batches.meta", "refused to load posix.mkdir"):
        data.load("cifar10", tmp_path)
    assert not target.exists()


# ---------------------------------------------------------------- image folders and their tar archives


def _folder_content(seed=0, size=32):
    """{split: {class: uint8 (n, H, W, 3)}}: 3 classes, 3 train and 2 test images each."""
    return {
        split: {cls: smooth_images(n, size, seed=seed + 10 * i + n) for i, cls in enumerate(("cat", "ant", "bee"))}
        for split, n in (("train", 3), ("test", 2))
    }


def _expected(content, split):
    """Images (N, 3, H, W) and labels in the loader's order: classes sorted by name, then files."""
    classes = sorted(content[split])
    images = np.concatenate([content[split][cls] for cls in classes]).transpose(0, 3, 1, 2)
    labels = np.concatenate([[label] * len(content[split][cls]) for label, cls in enumerate(classes)])
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64))


def _check_round_trip(dataset, content, tolerance):
    assert dataset.classes == ("ant", "bee", "cat")
    for split in ("train", "test"):
        images, labels = _expected(content, split)
        got = getattr(dataset, split)
        assert got.images.shape == images.shape and got.images.dtype == torch.uint8
        assert (got.images.int() - images.int()).abs().max() <= tolerance
        assert torch.equal(got.labels, labels)


@pytest.mark.parametrize(("suffix", "tolerance"), [(".png", 0), (".jpg", 8)], ids=["png-exact", "jpeg-lossy"])
def test_image_folder_round_trip(tmp_path, suffix, tolerance):
    content = _folder_content()
    write_image_folder(tmp_path / "folder", content, suffix)
    _check_round_trip(data.load("cifar10", tmp_path / "folder"), content, tolerance)


@pytest.mark.parametrize("prefix", ["", "cifar10-jpeg"], ids=["at-root", "in-top-directory"])
def test_image_folder_tar_round_trip(tmp_path, prefix):
    content = _folder_content()
    write_image_folder(tmp_path / "folder", content, ".png")
    (tmp_path / "folder" / "README.md").write_text("not an image: skipped")
    tar_folder(tmp_path / "folder", tmp_path / "images.tar.gz", prefix)
    assert cifar.detect_layout(tmp_path / "images.tar.gz") == "image-folder-tar"
    _check_round_trip(data.load("cifar10", tmp_path / "images.tar.gz"), content, 0)


def test_image_folder_grey_images_become_rgb(tmp_path):
    from PIL import Image

    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    for split in ("train", "test"):
        (tmp_path / split / "only").mkdir(parents=True)
        Image.fromarray(grey, mode="L").save(tmp_path / split / "only" / "a.png")
    dataset = data.load("cifar10", tmp_path)
    assert torch.equal(dataset.train.images[0], torch.from_numpy(grey).expand(3, 8, 8))


def test_image_folder_layout_errors_name_the_path(tmp_path):
    content = _folder_content()
    root = tmp_path / "folder"
    write_image_folder(root, content, ".png")
    (root / "test" / "dog").mkdir()
    with pytest.raises(data.DatasetError, match=r"train and test classes differ .*only in test: \['dog'\]"):
        data.load("cifar10", root)
    (root / "train" / "dog").mkdir()
    with _raises_naming(root, "train/dog/ holds no images"):
        data.load("cifar10", root)
    (root / "train" / "dog").rmdir()
    (root / "test" / "dog").rmdir()
    (root / "train" / "stray.png").write_bytes((root / "train" / "ant" / "000.png").read_bytes())
    with _raises_naming(root / "train" / "stray.png", "outside a class directory"):
        data.load("cifar10", root)
    (root / "train" / "stray.png").unlink()
    (root / "train" / "ant" / "notes.txt").write_text("x")
    with _raises_naming(root / "train" / "ant" / "notes.txt", "not a .jpg, .jpeg or .png image"):
        data.load("cifar10", root)
    (root / "train" / "ant" / "notes.txt").unlink()
    for name in ("ant", "bee", "cat"):
        for image in (root / "test" / name).iterdir():
            image.unlink()
        (root / "test" / name).rmdir()
    (root / "test").rmdir()
    with _raises_naming(root / "test", "is missing", data.DatasetNotFoundError):
        data.load("cifar10", root)


def test_image_folder_bad_images_are_named(tmp_path):
    content = _folder_content()
    write_image_folder(tmp_path, content, ".jpg")
    broken = tmp_path / "test" / "bee" / "001.jpg"
    broken.write_bytes(broken.read_bytes()[:100])
    with _raises_naming(broken, "cannot decode the image"):
        data.load("cifar10", tmp_path)
    smooth = _folder_content(size=16)["test"]["bee"]
    write_image_folder(tmp_path, {"test": {"bee": smooth}}, ".jpg")
    with pytest.raises(data.DatasetError, match="16x16 pixels but .*32x32"):
        data.load("cifar10", tmp_path)
    wide = {split: {"bee": np.zeros((1, 8, 16, 3), np.uint8)} for split in ("train", "test")}
    write_image_folder(tmp_path / "wide", wide, ".png")
    with _raises_naming(tmp_path / "wide", "train/bee/000.png is 16x8 pixels; expected square images"):
        data.load("cifar10", tmp_path / "wide")


def test_tar_errors_name_the_archive(tmp_path):
    content = _folder_content()
    write_image_folder(tmp_path / "folder", content, ".png")
    archive = tmp_path / "images.tar.gz"
    tar_folder(tmp_path / "folder", archive)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with _raises_naming(archive, "cannot read the tar archive"):
        data.load("cifar10", archive)

    only_train = {"train/cat/a.png": (tmp_path / "folder" / "train" / "cat" / "000.png").read_bytes()}
    write_tar(archive, only_train)
    with _raises_naming(archive, r"no test/<class>/ directory"):
        data.load("cifar10", archive)

    write_tar(archive, {"cifar-10-batches-py/data_batch_1": b"", "cifar-10-batches-py/test_batch": b""})
    with _raises_naming(archive, "holds the CIFAR-10 python batches.*unpack it"):
        data.load("cifar10", archive)

    write_tar(archive, {"README": b"nothing else"})
    with _raises_naming(archive, "without any train/<class>/<image>"):
        data.load("cifar10", archive)

    (tmp_path / "plain.txt").write_text("not a tar")
    with _raises_naming(tmp_path / "plain.txt", "not a readable tar archive"):
        data.load("cifar10", tmp_path / "plain.txt")


# ---------------------------------------------------------------- the decoded-image cache


def _count_decodes(monkeypatch):
    calls = []
    real = image_folder.decode

    def counting(blob, where):
        calls.append(where)
        return real(blob, where)

    monkeypatch.setattr(image_folder, "decode", counting)
    return calls


@pytest.mark.parametrize("as_tar", [False, True], ids=["directory", "tar"])
def test_cache_round_trip_and_staleness(tmp_path, monkeypatch, as_tar):
    content = _folder_content()
    folder, cache_dir = tmp_path / "folder", tmp_path / "cache"
    write_image_folder(folder, content, ".png")
    source = tmp_path / "images.tar.gz" if as_tar else folder
    if as_tar:
        tar_folder(folder, source)
    decodes = _count_decodes(monkeypatch)

    first = data.load("cifar10", source, cache_dir=cache_dir)
    assert len(decodes) == 15 and len(list(cache_dir.glob("*.npz"))) == 1
    second = data.load("cifar10", source, cache_dir=cache_dir)
    assert len(decodes) == 15, "a fresh cache entry must be used, not the images"
    assert torch.equal(first.train.images, second.train.images) and torch.equal(first.test.labels, second.test.labels)
    assert first.classes == second.classes and first.mean == second.mean

    # Change one image (and its modification time): the entry is stale and must not be used.
    changed = content["train"]["ant"].copy()
    changed[0] = 255 - changed[0]
    write_image_folder(folder, {"train": {"ant": changed}}, ".png")
    if as_tar:
        tar_folder(folder, source)
    target = source if as_tar else folder / "train" / "ant" / "000.png"
    stamp = target.stat().st_mtime_ns + 10**9  # a visibly later time, whatever the file system's resolution
    os.utime(target, ns=(stamp, stamp))
    third = data.load("cifar10", source, cache_dir=cache_dir)
    assert len(decodes) == 30
    assert torch.equal(third.train.images[0], torch.from_numpy(changed[0]).permute(2, 0, 1))
    assert len(list(cache_dir.glob("*.npz"))) == 1, "the stale entry is replaced, not kept beside the new one"


def test_cache_survives_damage_and_interrupted_writes(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "folder", _folder_content(), ".png")
    cache_dir = tmp_path / "cache"
    expected = data.load("cifar10", tmp_path / "folder")

    def interrupted(file, **arrays):
        file.write(b"PK\x03\x04 half an entry")
        raise KeyboardInterrupt

    monkeypatch.setattr(cache.np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.load("cifar10", tmp_path / "folder", cache_dir=cache_dir)
    assert list(cache_dir.iterdir()) == [], "an interrupted write leaves neither an entry nor a temporary file"
    monkeypatch.undo()

    data.load("cifar10", tmp_path / "folder", cache_dir=cache_dir)
    (entry,) = cache_dir.glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:1000])
    decodes = _count_decodes(monkeypatch)
    again = data.load("cifar10", tmp_path / "folder", cache_dir=cache_dir)
    assert len(decodes) == 15, "a damaged entry is rebuilt from the images"
    assert torch.equal(again.train.images, expected.train.images)


# ---------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_learnable():
    options = {"channels": 3, "image_size": 16, "num_classes": 4, "train_size": 400, "test_size": 200}
    first, second = data.load("synthetic", **options), data.load("synthetic", **options)
    other = data.load("synthetic", seed=1, **options)
    assert torch.equal(first.train.images, second.train.images) and torch.equal(first.test.labels, second.test.labels)
    assert not torch.equal(first.train.images, other.train.images)
    assert first.train.images.shape == (400, 3, 16, 16) and first.train.images.dtype == torch.uint8
    assert torch.bincount(first.train.labels).tolist() == [100] * 4
    # A nearest-class-mean classifier learns it, on the test images and on their mirror images
    # (the patterns are left-right symmetric, so flip augmentation keeps the label).
    x = first.train.images.float().flatten(1)
    means = torch.stack([x[first.train.labels == k].mean(0) for k in range(4)])
    for images in (first.test.images, first.test.images.flip(-1)):
        predicted = torch.cdist(images.float().flatten(1), means).argmin(1)
        assert (predicted == first.test.labels).float().mean() > 0.95


def test_synthetic_rejects_bad_sizes():
    with pytest.raises(data.DatasetError, match="num_classes must be an integer >= 2"):
        data.load("synthetic", num_classes=1)
    # The harness evaluates every epoch on the test split: an empty one is refused up front.
    with pytest.raises(data.DatasetError, match="test_size must be an integer >= 1, got 0"):
        data.load("synthetic", test_size=0)


# ---------------------------------------------------------------- batches


def _indexed_dataset(n=100, channels=3, size=32):
    """Images whose first pixel is their index (n <= 256), so a batch tells which images it holds."""
    images = torch.from_numpy(random_images(n, channels, size, seed=7))
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    split = data.Split(images, torch.arange(n) % 10)
    return data.Dataset.from_splits("toy", split, split, tuple("abcdefghij"))


def _raw(x, dataset):
    """Undo the normalisation: uint8-valued floats."""
    std, mean = torch.tensor(dataset.std).view(1, -1, 1, 1), torch.tensor(dataset.mean).view(1, -1, 1, 1)
    return (x * std + mean) * 255


def test_batches_normalise_in_order():
    dataset = data.load("synthetic", image_size=8, train_size=300, test_size=10)
    xs, ys = zip(*data.batches(dataset.train, dataset, 64, shuffle=False))
    x, y = torch.cat(xs), torch.cat(ys)
    assert [len(b) for b in ys] == [64, 64, 64, 64, 44] and x.dtype == torch.float32 and y.dtype == torch.int64
    mean, std = torch.tensor(dataset.mean).view(1, 3, 1, 1), torch.tensor(dataset.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (dataset.train.images.float() / 255 - mean) / std, rtol=0, atol=1e-5)
    assert torch.equal(y, dataset.train.labels)
    # Normalised with the train statistics, the train set has mean 0 and std 1 per channel.
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(x.std(dim=(0, 2, 3), correction=0), torch.ones(3), rtol=0, atol=1e-5)


def test_batches_drop_last_and_count():
    dataset = _indexed_dataset(100)
    for drop_last, world_size, sizes in ((False, 1, [32, 32, 32, 4]), (True, 1, [32, 32, 32]), (False, 3, [32, 1])):
        got = [
            len(y)
            for _, y in data.batches(
                dataset.train, dataset, 32, shuffle=False, drop_last=drop_last, world_size=world_size
            )
        ]
        assert got == sizes
        assert data.num_batches(dataset.train, 32, drop_last=drop_last, world_size=world_size) == len(sizes)


def test_batches_shuffle_is_deterministic_given_the_generator():
    dataset = _indexed_dataset(100)

    def order(seed):
        epoch = data.batches(dataset.train, dataset, 16, shuffle=True, generator=torch.Generator().manual_seed(seed))
        return torch.cat([_raw(x, dataset)[:, 0, 0, 0].round().long() for x, _ in epoch])

    assert torch.equal(order(0), order(0))
    assert not torch.equal(order(0), order(1))
    assert sorted(order(0).tolist()) == list(range(100))


def test_batches_shards_are_disjoint_and_equal():
    dataset = _indexed_dataset(100)
    shards = []
    for rank in range(3):
        generator = torch.Generator().manual_seed(5)  # every rank seeds alike, as the docstring asks
        epoch = data.batches(dataset.train, dataset, 8, shuffle=True, generator=generator, rank=rank, world_size=3)
        batches = list(epoch)
        assert len(batches) == data.num_batches(dataset.train, 8, world_size=3)
        shards.append(torch.cat([_raw(x, dataset)[:, 0, 0, 0].round().long() for x, _ in batches]).tolist())
    assert [len(s) for s in shards] == [33, 33, 33]
    assert len(set(shards[0]) | set(shards[1]) | set(shards[2])) == 99


def _crops(image: torch.Tensor, flips: bool) -> list[torch.Tensor]:
    """Every crop (and mirror, when ``flips``) the augmentation may make of ``image`` (C, H, W)."""
    _, h, w = image.shape
    padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
    crops = [padded[:, i : i + h, j : j + w] for i in range(9) for j in range(9)]
    return crops + [c.flip(-1) for c in crops] if flips else crops


@pytest.mark.parametrize(("channels", "size", "flips"), [(3, 32, True), (1, 28, False)], ids=["cifar", "mnist"])
def test_augmentation_crops_and_flips_whole_batches(channels, size, flips):
    dataset = _indexed_dataset(64, channels, size)

    def epoch(seed):
        generator = torch.Generator().manual_seed(seed)
        return list(data.batches(dataset.train, dataset, 32, shuffle=False, generator=generator, augment=True))

    first, again = epoch(0), epoch(0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, epoch(1)))
    augmented = torch.cat([_raw(x, dataset).round().to(torch.uint8) for x, _ in first])
    assert augmented.shape == dataset.train.images.shape
    kinds = set()
    for original, out in zip(dataset.train.images, augmented):
        matches = [k for k, crop in enumerate(_crops(original, flips=True)) if torch.equal(crop, out)]
        assert matches, "every output is a crop (or mirrored crop) of its own padded image"
        kinds.add(matches[0] >= 81)
    assert kinds == ({False, True} if flips else {False}), "colour images are mirrored sometimes, grey ones never"


def test_augmentation_leaves_small_images_alone():
    dataset = data.load("digits")
    plain = next(iter(data.batches(dataset.train, dataset, 50, shuffle=False)))[0]
    generator = torch.Generator().manual_seed(0)
    augmented = next(iter(data.batches(dataset.train, dataset, 50, shuffle=False, generator=generator, augment=True)))
    assert torch.equal(plain, augmented[0])


def test_batches_reject_bad_arguments():
    dataset = _indexed_dataset(10)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        data.batches(dataset.train, dataset, 0, shuffle=False)
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        data.batches(dataset.train, dataset, 4, shuffle=False, rank=2, world_size=2)


# ---------------------------------------------------------------- the real copies in ../shared/datasets


@pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason=f"no MNIST copy at {SHARED / 'mnist'} (set DFP_DATASETS)")
def test_real_mnist():
    dataset = data.load("mnist", SHARED / "mnist")
    assert (len(dataset.train), len(dataset.test)) == (60000, 10000)
    assert dataset.train.images.shape == (60000, 1, 28, 28)
    assert dataset.train.labels[:4].tolist() == [5, 0, 4, 1] and dataset.test.labels[:4].tolist() == [7, 2, 1, 0]
    assert torch.bincount(dataset.train.labels).tolist()[:2] == [5923, 6742]
    assert abs(dataset.mean[0] - 0.1307) < 1e-4 and abs(dataset.std[0] - 0.3081) < 1e-4


CIFAR_TAR = SHARED / "cifar10-jpeg.tar.gz"


@pytest.mark.skipif(not CIFAR_TAR.is_file(), reason=f"no CIFAR-10 archive at {CIFAR_TAR} (set DFP_DATASETS)")
def test_real_cifar10_archive_layout():
    assert cifar.detect_layout(CIFAR_TAR) == "image-folder-tar"
    images = [e for e in itertools.islice(image_folder.tar_entries(CIFAR_TAR), 40) if e.image is not None][:5]
    assert images, "the first members include images"
    for entry in images:
        assert entry.split in ("train", "test") and entry.cls in CIFAR_CLASSES
        assert entry.image.shape == (32, 32, 3) and entry.image.dtype == np.uint8
