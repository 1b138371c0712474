"""Builds dfp._C, the torch-free C++ core. Each ISA's file gets its own flags (never
-march=native): the path that runs is chosen at run time from cpuid.

-ffp-contract=off: the numerics contract rounds every product and sum separately, and a
fused multiply-add would change bits. -fno-strict-aliasing: int16 mantissas are read
as int32 K-pairs."""

import platform
import shutil
import sys
from pathlib import Path

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext, has_flag
from setuptools import setup
from setuptools.command.build_py import build_py

COMMON = ["-O2", "-std=c++17", "-ffp-contract=off", "-fno-strict-aliasing", "-fvisibility=hidden", "-Wall", "-Wextra"]
X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
# Flags per source file, by the suffix of its name; the rest is portable C++.
ISA_FLAGS = {
    "_avx2.cpp": ["-mavx2", "-mfma"],
    "_avx512bw.cpp": ["-mavx512f", "-mavx512bw"],
    "_avx512vnni.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-mavx512vnni"],
    "_avx512bf16.cpp": ["-mavx512f", "-mavx512bw", "-mavx512bf16"],
    "_amx.cpp": ["-mamx-tile", "-mamx-int8", "-mamx-bf16"],
}


# GCC's partial redundancy elimination moves every int32 accumulator between two
# registers once per K-pair in the micro-kernels (6 extra uops per 18); without it the
# inner loop is just loads, broadcasts and multiply-adds.
MICRO_KERNEL_FLAGS = ["-fno-tree-pre"]


def isa_flags(source: str) -> list[str]:
    return next((flags for suffix, flags in ISA_FLAGS.items() if source.endswith(suffix)), [])


# The portable loops that move data (gathering patches, packing, the epilogue) or make
# block exponents have trip counts known only at run time, which -O2's vectorizer cost
# model leaves scalar. -O3 changes no rounding here: -ffp-contract=off stays, and nothing
# reassociates.
VECTORIZED = {
    "batch_norm.cpp", "batch_norm_avx2.cpp", "batch_norm_avx512bw.cpp", "conv.cpp", "pack.cpp", "gemm.cpp",
    "grad_input.cpp", "layer.cpp", "quantize.cpp", "quantize_input.cpp"
}  # fmt: skip


def file_flags(source: str) -> list[str]:
    name = Path(source).name
    return (
        isa_flags(source)
        + (MICRO_KERNEL_FLAGS if name.startswith("ukernel_") else [])
        + (["-O3"] if name in VECTORIZED else [])
    )


# Files built only where the compiler knows their flags (AMX needs GCC 11 or clang 12),
# each announcing itself to the rest by a macro: the AMX register peaks are a benchmark's
# yardstick, not something a build should fail for.
OPTIONAL_SOURCES = {"csrc/cpu/peak_amx.cpp": "DFP_AMX_PROBES"}


class PerFileFlagsBuildExt(build_ext):
    def build_extensions(self):
        for ext in self.extensions:
            for source, macro in OPTIONAL_SOURCES.items():
                if source not in ext.sources:
                    continue
                if all(has_flag(self.compiler, flag) for flag in isa_flags(source)):
                    ext.define_macros.append((macro, "1"))
                else:
                    ext.sources.remove(source)
        compile_one = self.compiler._compile

        def compile_with_isa_flags(obj, src, ext, cc_args, extra_postargs, pp_opts):
            compile_one(obj, src, ext, cc_args, extra_postargs + file_flags(src), pp_opts)

        self.compiler._compile = compile_with_isa_flags
        super().build_extensions()


class BuildPyWithCudaSources(build_py):
    """Ships csrc/cuda (compiled at run time by NVRTC, never at install) as dfp/cuda/src."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "dfp" / "cuda" / "src"
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted(Path("csrc/cuda").iterdir()):
            if source.suffix in (".cu", ".h"):
                shutil.copy2(source, target / source.name)


ParallelCompile("DFP_BUILD_JOBS", default=0).install()  # all cores; DFP_BUILD_JOBS=1 for one

sources = ["csrc/bindings.cpp"] + sorted(str(p) for p in Path("csrc/cpu").glob("*.cpp") if X86 or not isa_flags(str(p)))

setup(
    ext_modules=[
        Pybind11Extension(
            "dfp._C",
            sources,
            # headers too, so that editing one rebuilds (setuptools skips an extension
            # whose sources are older than it; ParallelCompile then compiles every file)
            depends=sorted(str(p) for p in Path("csrc/cpu").glob("*.h")),
            extra_compile_args=COMMON,
            define_macros=[("DFP_X86_KERNELS", "1")] if X86 else [],
            libraries=["dl"] if sys.platform.startswith("linux") else [],  # dlopen, before glibc 2.34
        )
    ],
    cmdclass={"build_ext": PerFileFlagsBuildExt, "build_py": BuildPyWithCudaSources},
)
