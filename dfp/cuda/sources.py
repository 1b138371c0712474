"""Where the CUDA sources are: ``dfp/cuda/src`` in an installed wheel (copied there from
``csrc/cuda`` at build time), ``csrc/cuda`` of the repository in an editable install."""

from __future__ import annotations

from pathlib import Path

from .._errors import BackendUnavailableError

HEADER = "dfp_cuda.h"
_PACKAGED = Path(__file__).resolve().parent / "src"
_REPOSITORY = Path(__file__).resolve().parents[2] / "csrc" / "cuda"


def source_dir() -> Path:
    """The directory holding the ``.cu`` files and ``dfp_cuda.h``."""
    for candidate in (_PACKAGED, _REPOSITORY):
        if (candidate / HEADER).is_file():
            return candidate
    raise BackendUnavailableError(
        f"dfp's CUDA sources are missing: neither {_PACKAGED} (an installed wheel) nor {_REPOSITORY} "
        f"(a source checkout) holds {HEADER} and the .cu files. Reinstall dfp, or install it from the "
        "repository with `pip install -e .`."
    )


def cuda_files() -> list[Path]:
    """Every ``.cu`` file, sorted by name."""
    return sorted(source_dir().glob("*.cu"))


def read_source(name: str) -> str:
    """The text of the CUDA source file ``name`` (e.g. ``"quantize.cu"``)."""
    path = source_dir() / name
    if not path.is_file():
        raise BackendUnavailableError(f"dfp's CUDA source {path} is missing; reinstall dfp")
    return path.read_text()
