"""DFP16 on NVIDIA GPUs: quantization, dequantization and the exact integer GEMM as CUDA
kernels compiled at run time (NVRTC), for every GPU from Pascal (sm_61) to Hopper.

``dfp.backends.active`` sends the registered ops' CUDA tensors here (``dfp.cuda.ops``);
importing this package does not initialise CUDA, and builds nothing: each kernel is
compiled for the GPU at hand on first use and kept. The layers
(``dfp.functional``, ``dfp.nn``) run on top of these ops. Sources: ``csrc/cuda``.

GEMM paths (``DFP_CUDA_GEMM`` forces one; see ``dfp.cuda.gemm``): ``mma`` (int8 tensor
cores, int16 mantissas split into int8 limbs on chip), ``int16`` (CUDA cores), ``limbs``
(``torch._int_mm`` on stacked limbs). All give the bits of ``dfp.reference``.
"""

from __future__ import annotations

from .gemm import PATHS, choose_path, mma_applies
from .loader import ensure_cuda
from .ops import ensure_available
from .quantize import dequantize

__all__ = ["PATHS", "choose_path", "dequantize", "ensure_available", "ensure_cuda", "is_available", "mma_applies"]


def is_available() -> bool:
    """Whether dfp's CUDA kernels can run here: a CUDA device and a run-time compiler
    (``torch.cuda._compile_kernel`` or cupy). Does not initialise CUDA."""
    try:
        ensure_available()
    except RuntimeError:  # BackendUnavailableError, or a broken driver behind torch.cuda
        return False
    return True
