"""Synthetic images for speed runs: deterministic, learnable, and as large as asked."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dataset import Dataset, Split
from .errors import DatasetError

# Pixel levels: a mid-grey base, the class pattern's amplitude and the per-pixel noise's std.
_BASE, _SIGNAL, _NOISE = 128.0, 48.0, 48.0
# The class patterns are random 4x4 grids scaled up, so they vary smoothly over the image.
_PATTERN_GRID = 4


def load_synthetic(
    *,
    channels: int = 3,
    image_size: int = 32,
    num_classes: int = 10,
    train_size: int = 10_000,
    test_size: int = 2_000,
    seed: int = 0,
) -> Dataset:
    """uint8 images (N, channels, image_size, image_size): a smooth pattern per class plus noise.

    Each class has one random low-frequency pattern, made left-right symmetric so that the
    horizontal flips of ``batches(augment=True)`` keep the class; every image adds independent
    Gaussian pixel noise (std 48 levels against a pattern amplitude of 48). Classes are balanced.
    The same arguments give the same bytes.
    """
    for label, value, least in (
        ("channels", channels, 1),
        ("image_size", image_size, 1),
        ("num_classes", num_classes, 2),
        ("train_size", train_size, 1),
        ("test_size", test_size, 1),  # every epoch of the harness is evaluated on the test split
    ):
        if not isinstance(value, int) or value < least:
            raise DatasetError(f"synthetic: {label} must be an integer >= {least}, got {value!r}")
    generator = torch.Generator().manual_seed(seed)
    grid = torch.randn(num_classes, channels, _PATTERN_GRID, _PATTERN_GRID, generator=generator)
    patterns = F.interpolate(grid, size=(image_size, image_size), mode="bilinear", align_corners=False)
    patterns = (patterns + patterns.flip(-1)) / 2
    patterns = patterns / patterns.flatten(1).std(dim=1).clamp_min(1e-6)[:, None, None, None]
    splits = [_sample(patterns, n, generator) for n in (train_size, test_size)]
    classes = tuple(f"pattern_{i}" for i in range(num_classes))
    return Dataset.from_splits("synthetic", splits[0], splits[1], classes)


def _sample(patterns: torch.Tensor, n: int, generator: torch.Generator) -> Split:
    num_classes = patterns.shape[0]
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=generator)]
    noise = torch.randn((n, *patterns.shape[1:]), generator=generator)
    levels = _BASE + _SIGNAL * patterns[labels] + _NOISE * noise
    return Split(levels.round().clamp(0, 255).to(torch.uint8), labels)
