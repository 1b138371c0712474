"""The patch matrix of a convolution over a zero-padded channels-last image: GEMM rows
``M = N*OH*OW`` output pixels, K ordered ``(kh, kw, ci)``. The compiled backend gathers
patches one cache block at a time; ``im2col`` materialises them for the other backends."""

from __future__ import annotations

import torch


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one spatial axis (symmetric padding)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def im2col(
    x: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> torch.Tensor:
    """Contiguous padded input (N, Hp, Wp, C) -> patches (G, N*OH*OW, KH*KW*C/G), K
    ordered (kh, kw, ci); row m = (n, oh, ow). A view when no copy is needed (a 1x1
    kernel at stride 1 with one group), otherwise one copy in x's dtype."""
    n, hp, wp, c = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    oh, ow = output_size(hp, kh, sh, 0, dh), output_size(wp, kw, sw, 0, dw)
    cg = c // groups
    s_n, s_h, s_w, _ = x.stride()
    patches = x.as_strided(
        (n, oh, ow, kh, kw, groups, cg),
        (s_n, sh * s_h, sw * s_w, dh * s_h, dw * s_w, cg, 1),
        x.storage_offset(),
    )
    return patches.permute(5, 0, 1, 2, 3, 4, 6).reshape(groups, n * oh * ow, kh * kw * cg)
