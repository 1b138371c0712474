"""Mini-batches for training and evaluation: shuffling, sharding across ranks, augmentation and
normalisation, all on whole batch tensors."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .dataset import Dataset, Split

# CIFAR-style augmentation: crops of the image padded by 4 zero pixels on every side.
PADDING = 4
# Smaller images (8x8 digits) are not augmented: a 4-pixel shift would cut away half the digit.
MIN_AUGMENT_SIZE = 28


def num_batches(split: Split, batch_size: int, drop_last: bool = False, world_size: int = 1) -> int:
    """How many batches ``batches`` yields per epoch on each rank."""
    _check(batch_size, 0, world_size)
    per_rank = len(split) // world_size
    return per_rank // batch_size if drop_last else -(-per_rank // batch_size)


def batches(
    split: Split,
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    augment: bool = False,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of ``split`` as (images float32 (B, C, H, W), labels int64 (B,)) on the CPU.

    Images are scaled to [0, 1] and normalised with ``dataset.mean`` / ``dataset.std``.

    shuffle: visit the images in the order of a random permutation drawn from ``generator``
        (a CPU generator; None: torch's global one). The same generator state gives the same
        batches: seed one generator per run and pass it to every epoch (each epoch draws the
        next permutation, as the harness does), or seed one per epoch (``seed + epoch``);
        either way identically on every rank.
    augment: random crops of the image zero-padded by 4 pixels (black, before normalisation)
        and, for colour images, random horizontal flips; only for images of at least 28
        pixels, so MNIST is shifted but never mirrored and the 8x8 digits are left alone.
        The random numbers come from ``generator`` too, different on each rank.
    drop_last: drop the last batch when it is smaller than ``batch_size``.
    rank, world_size: this process's share of the epoch for DistributedDataParallel: the
        permutation, cut to a multiple of ``world_size``, is dealt out round-robin, so the
        ranks get disjoint shards of ``len(split) // world_size`` images and run the same
        number of steps (``num_batches``).
    """
    _check(batch_size, rank, world_size)
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if world_size > 1:
        order = order[: n // world_size * world_size][rank::world_size]
    augmenter = None
    if augment and dataset.image_size >= MIN_AUGMENT_SIZE:
        # One draw from the shared generator seeds each rank's own stream, so ranks crop differently.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator)) + rank
        augmenter = torch.Generator().manual_seed(seed)
    std = torch.tensor(dataset.std, dtype=torch.float32).view(1, -1, 1, 1)
    mean = torch.tensor(dataset.mean, dtype=torch.float32).view(1, -1, 1, 1)
    scale, shift = 1.0 / (255.0 * std), -mean / std
    return _iterate(split, order, batch_size, drop_last, augmenter, dataset.channels == 3, scale, shift)


def _iterate(split, order, batch_size, drop_last, augmenter, flip, scale, shift):
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        if drop_last and len(index) < batch_size:
            return
        images = split.images[index]
        if augmenter is not None:
            images = random_crop_flip(images, augmenter, flip=flip)
        yield images.to(torch.float32).mul_(scale).add_(shift), split.labels[index]


def random_crop_flip(
    images: torch.Tensor, generator: torch.Generator, *, flip: bool, padding: int = PADDING
) -> torch.Tensor:
    """Each image (B, C, H, W) cropped at a random offset from itself zero-padded by ``padding``
    pixels, and mirrored left-right with probability 1/2 when ``flip``; one gather for the batch."""
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    top = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator)
    rows = top + torch.arange(h)  # (B, H): source row of each output row
    cols = left + torch.arange(w)  # (B, W)
    if flip:
        mirrored = torch.rand(b, 1, generator=generator) < 0.5
        cols = torch.where(mirrored, cols.flip(1), cols)
    source = (rows[:, :, None] * (w + 2 * padding) + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return padded.view(b, c, -1).gather(2, source).view(b, c, h, w)


def _check(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
