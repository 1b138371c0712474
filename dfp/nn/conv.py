"""dfp.nn.Conv2d: torch.nn.Conv2d computing in a dfp format."""

from __future__ import annotations

import torch
from torch import nn

from .. import functional
from .._batch_statistics import Demand, demanded_by
from ..format import DFPSpec
from ..formats import Format
from ._layer import DFPLayer


class Conv2d(DFPLayer, nn.Conv2d):
    """``torch.nn.Conv2d`` whose products run in ``fmt`` (default "dfp16": int16 x int16
    -> int32 GEMMs in the forward pass and in both backward products).

    The constructor takes torch's arguments plus the keyword ``fmt``: a name ("dfp16",
    "dfp16-sr", "fp32", "bf16", "fp16"), a ``DFPSpec`` or a ``dfp.formats.Format``.
    Parameters, ``state_dict`` keys, hooks and optimizers are those of a plain Conv2d:
    torch checkpoints load either way with ``strict=True``. Shapes: input (N, C_in, H, W)
    or (C_in, H, W), NCHW or channels_last; output (N, C_out, H_out, W_out) as in torch,
    in the input's memory format, float32 for dfp formats.

    See the ``dfp.nn`` docstring for autocast and GradScaler.
    """

    float_class = nn.Conv2d
    shape_args = (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
    )

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        fmt: str | DFPSpec | Format = "dfp16",
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        self.fmt = fmt

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced, it takes the registered op, which hands nothing over
            return self._conv(input)
        with demanded_by(self._statistics_demand):
            return self._conv(input)

    def _conv(self, input: torch.Tensor) -> torch.Tensor:
        return functional.conv2d(
            input,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            fmt=self.fmt,
            padding_mode=self.padding_mode,
        )

    @property
    def _statistics_demand(self) -> Demand:
        """Whether a batch norm takes this layer's output statistics (``Demand``); made at the
        first forward, so that a layer unpickled from before it existed has one too."""
        demand = self.__dict__.get("_demand")
        if demand is None:
            demand = self.__dict__["_demand"] = Demand()
        return demand
