"""Optimizers for low-precision training: SWALP (SGD with DFP16 weights) and the fp32
stochastic weight average of its iterates."""

from .swalp import SWALP
from .weight_average import WeightAverage

__all__ = ["SWALP", "WeightAverage"]
