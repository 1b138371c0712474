"""Reader for IDX files of unsigned bytes (the MNIST format), raw or gzip-compressed.

An IDX file is: two zero bytes, a type byte (0x08: unsigned byte), a byte giving the number
of dimensions, one big-endian uint32 per dimension, then the values in C order.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np

from .errors import DatasetError

_UNSIGNED_BYTE = 0x08


def read_idx(path: Path, ndim: int, layout: str) -> np.ndarray:
    """The uint8 array stored in ``path`` (``.gz``: gzip-compressed), which must have ``ndim`` dimensions.

    ``layout`` describes what was expected; it ends every error message, which names ``path``.
    """
    data = _read_bytes(path, layout)
    expected_magic = bytes([0, 0, _UNSIGNED_BYTE, ndim])
    if data[:4] != expected_magic:
        raise DatasetError(
            f"{path}: bad IDX magic number 0x{data[:4].hex()} (expected 0x{expected_magic.hex()}: "
            f"unsigned bytes in {ndim} dimension(s)); expected {layout}"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(data)} bytes); expected {layout}")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = header + math.prod(dims)
    if len(data) != size:
        state = "truncated" if len(data) < size else "has trailing bytes"
        raise DatasetError(
            f"{path}: {state}: {len(data)} bytes, but the header's dimensions {dims} need {size}; expected {layout}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _read_bytes(path: Path, layout: str) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        # gzip reports a damaged or cut-off stream as BadGzipFile (an OSError), EOFError or zlib.error.
        raise DatasetError(f"{path}: cannot read ({err}); expected {layout}") from err
