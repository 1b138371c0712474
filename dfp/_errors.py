"""Exceptions raised by dfp."""


class NonFiniteError(ValueError):
    """A tensor to be quantized holds NaN or Inf; DFP16 cannot represent them."""


class BackendUnavailableError(RuntimeError):
    """The selected backend (compiled core, numba) cannot be used on this machine."""
