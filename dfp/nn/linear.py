"""dfp.nn.Linear: torch.nn.Linear computing in a dfp format."""

from __future__ import annotations

import torch
from torch import nn

from .. import functional
from ..format import DFPSpec
from ..formats import Format
from ._layer import DFPLayer


class Linear(DFPLayer, nn.Linear):
    """``torch.nn.Linear`` whose products run in ``fmt`` (default "dfp16": int16 x int16
    -> int32 GEMMs in the forward pass and in both backward products).

    The constructor takes torch's arguments plus the keyword ``fmt``: a name ("dfp16",
    "dfp16-sr", "fp32", "bf16", "fp16"), a ``DFPSpec`` or a ``dfp.formats.Format``.
    Parameters, ``state_dict`` keys, hooks and optimizers are those of a plain Linear.
    Shapes: input (*, in_features), output (*, out_features), float32 for dfp formats.

    See the ``dfp.nn`` docstring for autocast and GradScaler.
    """

    float_class = nn.Linear
    shape_args = ("in_features", "out_features")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        fmt: str | DFPSpec | Format = "dfp16",
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.fmt = fmt

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return functional.linear(input, self.weight, self.bias, fmt=self.fmt)
