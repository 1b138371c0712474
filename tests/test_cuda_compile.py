"""The CUDA sources without a GPU: every .cu file compiles with nvcc for sm_75, sm_80,
sm_86, sm_89 and sm_90 without a warning (-Werror all-warnings) and, where an NVRTC
library is found, with NVRTC as the loader runs it (sm_61 too); the numerics of csrc/cuda/dfp_cuda.h
(all __host__ __device__) run on the CPU, through the kernels' own arithmetic, bit-identical
to dfp.reference. Skips, saying why, where nvcc is absent.

The compiles run once per session, in parallel, into a temporary directory (cubins only).
"""

from __future__ import annotations

import ctypes
import itertools
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import int16_operand, wide_range

from dfp import reference
from dfp.cuda import gemm as cuda_gemm
from dfp.cuda import loader
from dfp.cuda.sources import cuda_files, source_dir
from dfp.format import exact_pow2

ARCHS = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90")
PASCAL = "sm_61"
NVCC = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)
FLAGS = ("-std=c++17", "-Werror", "all-warnings")

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed (CUDA toolkit absent): nothing to compile")


def _nvcc_archs() -> set[str]:
    done = subprocess.run([NVCC, "--list-gpu-arch"], capture_output=True, text=True, check=False)
    return {line.strip().replace("compute_", "sm_") for line in done.stdout.splitlines()}


def _compile(source: Path, arch: str, out_dir: Path, defines: tuple[str, ...] = ()):
    out = out_dir / f"{source.stem}_{arch}{''.join(defines)}.cubin"
    command = [NVCC, f"-arch={arch}", "-cubin", *FLAGS, *defines, f"-I{source_dir()}", "-o", str(out), str(source)]
    return subprocess.run(command, capture_output=True, text=True, check=False), out


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """(file name, arch) -> (CompletedProcess, cubin path) for every .cu file and arch, compiled in parallel."""
    if NVCC is None:
        pytest.skip("nvcc is not installed (CUDA toolkit absent): nothing to compile")
    out_dir = tmp_path_factory.mktemp("cubins")
    jobs = [(f, arch) for f in cuda_files() for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(lambda job: _compile(*job, out_dir), jobs))
    return {(f.name, arch): result for (f, arch), result in zip(jobs, results)}


def _check(result):
    done, out = result
    assert done.returncode == 0, f"nvcc failed:\n{done.stdout}\n{done.stderr}"
    assert "warning" not in (done.stdout + done.stderr).lower(), done.stderr
    assert out.is_file() and out.stat().st_size > 0


def test_sources_are_found():
    names = {p.name for p in cuda_files()}
    assert {"quantize.cu", "gemm_int16.cu", "gemm_mma.cu"} <= names
    assert (source_dir() / "dfp_cuda.h").is_file()


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", [p.name for p in cuda_files()])
def test_compiles_without_warnings(compiled, name, arch):
    _check(compiled[(name, arch)])


def _variants(names: tuple[str, ...], *tunings: dict[str, int]) -> list[tuple[str, ...]]:
    """The -D options of every compile-time variant: each name 0 or 1, with each tuning."""
    return [
        tuple(f"-D{name}={on}" for name, on in zip(names, flags, strict=True))
        + tuple(f"-D{k}={v}" for k, v in tuning.items())
        for flags in itertools.product((0, 1), repeat=len(names))
        for tuning in tunings or ({},)
    ]


def _gemm_variants() -> list[tuple[str, tuple[str, ...]]]:
    """(file, -D options) of every compile-time variant of the GEMM kernels (dfp.cuda.gemm picks one per launch)."""
    return (
        [("gemm_int16.cu", d) for d in _variants(cuda_gemm.INT16_VARIANTS)]
        + [("gemm_mma.cu", d) for d in _variants(cuda_gemm.MMA_VARIANTS)]
        + [
            ("gemm_mma_pipelined.cu", d)
            for d in _variants(cuda_gemm.PIPELINED_VARIANTS, {"DFP_MMA_MIN_BLOCKS": 1}, {"DFP_MMA_MIN_BLOCKS": 2})
        ]
    )


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_75", "sm_90"])
def test_every_gemm_variant_compiles_without_warnings(tmp_path, arch):
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(lambda v: _compile(source_dir() / v[0], arch, tmp_path, v[1]), _gemm_variants()))
    for result in results:
        _check(result)


@needs_nvcc
def test_pascal_compiles_where_nvcc_still_targets_it(tmp_path):
    """sm_61 (Pascal): the CUDA-core kernels are meant for it. CUDA 13's nvcc dropped it;
    a CUDA 12 NVRTC (what torch and cupy for CUDA 12 bring) still compiles it at run time."""
    if PASCAL not in _nvcc_archs():
        version = subprocess.run([NVCC, "--version"], capture_output=True, text=True, check=False).stdout
        release = re.search(r"release [\d.]+", version)
        pytest.skip(f"this nvcc ({release.group(0) if release else 'unknown'}) no longer targets {PASCAL}")
    for name, defines in (("quantize.cu", ()), ("gemm_int16.cu", ()), ("gemm_int16.cu", ("-DDFP_GATHER=1",))):
        _check(_compile(source_dir() / name, PASCAL, tmp_path, defines))


# ---- NVRTC, the compiler that runs them -----------------------------------------------


NVRTC = loader.nvrtc_library()


def _fake_wheel(site: Path, sub: str, name: str) -> Path:
    """An empty file where an NVIDIA wheel installed in ``site`` puts its libnvrtc."""
    path = site / "nvidia" / sub / name
    path.parent.mkdir(parents=True)
    path.touch()
    (path.parent / f"libnvrtc-builtins{name.removeprefix('libnvrtc')}").touch()  # the wheels ship it beside
    return path


def test_nvrtc_is_found_where_the_cuda_12_and_13_wheels_put_it(tmp_path, monkeypatch):
    monkeypatch.delenv("DFP_NVRTC_LIBRARY", raising=False)
    cu13 = _fake_wheel(tmp_path / "torch-2.14", "cu13/lib", "libnvrtc.so.13")
    cu12 = _fake_wheel(tmp_path / "torch-2.13", "cuda_nvrtc/lib", "libnvrtc.so.12")
    assert loader.nvrtc_library([tmp_path / "torch-2.14" / "nvidia"]) == str(cu13)
    assert loader.nvrtc_library([tmp_path / "torch-2.13" / "nvidia"]) == str(cu12)
    assert loader.nvrtc_library([tmp_path / "nowhere", tmp_path / "torch-2.14" / "nvidia"]) == str(cu13)
    # by default: the installed nvidia package, here the fake one put first on sys.path
    monkeypatch.delitem(sys.modules, "nvidia", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "torch-2.14"))
    assert loader.nvrtc_library() == str(cu13)
    monkeypatch.setenv("DFP_NVRTC_LIBRARY", "/opt/nvrtc/libnvrtc.so")
    assert loader.nvrtc_library() == "/opt/nvrtc/libnvrtc.so"


NVRTC_JOBS = (  # (file, arch, -D options)
    [(f, arch, ()) for f in cuda_files() for arch in ARCHS]
    + [(source_dir() / name, PASCAL, ()) for name in ("quantize.cu", "gemm_int16.cu")]
    + [(source_dir() / "gemm_int16.cu", PASCAL, ("-DDFP_GATHER=1",))]
    + [(source_dir() / name, arch, defines) for arch in ("sm_75", "sm_90") for name, defines in _gemm_variants()]
)


def _nvrtc_compile(lib, source: Path, arch: str, defines: tuple[str, ...]) -> tuple[int, str, int]:
    """(NVRTC result, program log, cubin bytes) with the options dfp.cuda's loader uses."""
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.read_bytes(), source.name.encode(), 0, None, None) == 0
    options = [f"--gpu-architecture={arch}".encode(), f"-I{source_dir()}".encode()]
    options += [o.encode() for o in (*loader.NVRTC_OPTIONS, *defines)]
    result = lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    cubin = ctypes.c_size_t(0)
    if result == 0:
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(cubin))
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return result, log.value.decode(errors="replace"), cubin.value


@pytest.fixture(scope="session")
def nvrtc_compiled():
    if NVRTC is None:
        pytest.skip(
            "no NVRTC library (set DFP_NVRTC_LIBRARY, or install nvidia-cuda-nvrtc-cu12 or a CUDA build of torch): "
            "nothing to compile"
        )
    lib = _open_nvrtc(Path(NVRTC))
    archs = _nvrtc_archs(lib)
    jobs = [job for job in NVRTC_JOBS if job[1] in archs]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:  # ctypes calls release the GIL
        results = list(pool.map(lambda job: _nvrtc_compile(lib, *job), jobs))
    return {(f.name, arch, defines): result for (f, arch, defines), result in zip(jobs, results)}


def _open_nvrtc(library: Path) -> ctypes.CDLL:
    """libnvrtc, its builtins loaded first: the CUDA 13 wheel's libnvrtc has no RUNPATH, so
    it finds the libnvrtc-builtins beside it only when that is already loaded (torch
    preloads it; a bare ctypes load does not)."""
    for builtins in sorted(library.parent.glob("libnvrtc-builtins.so*")):
        ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(str(library))


def _nvrtc_archs(lib) -> set[str]:
    """The sm_XY targets of this NVRTC (CUDA 13's no longer has sm_61)."""
    count = ctypes.c_int()
    assert lib.nvrtcGetNumSupportedArchs(ctypes.byref(count)) == 0
    archs = (ctypes.c_int * count.value)()
    assert lib.nvrtcGetSupportedArchs(archs) == 0
    return {f"sm_{arch}" for arch in archs}


@pytest.mark.parametrize(
    ("name", "arch", "defines"), [(f.name, arch, defines) for f, arch, defines in NVRTC_JOBS], ids=str
)
def test_nvrtc_compiles_without_warnings(nvrtc_compiled, name, arch, defines):
    """What the loader does at run time (NVRTC, no host headers), Pascal included: a CUDA 12
    NVRTC still targets sm_61 and only notes that it is deprecated."""
    if (name, arch, defines) not in nvrtc_compiled:
        pytest.skip(f"this NVRTC ({NVRTC}) no longer targets {arch}")
    result, log, size = nvrtc_compiled[(name, arch, defines)]
    assert result == 0, log
    lines = [line for line in log.splitlines() if line.strip() and "are deprecated" not in line]
    assert not lines, log
    assert size > 0


# ---- the header's numerics on the CPU -------------------------------------------------

HOST_PROGRAM = r"""
// Runs csrc/cuda/dfp_cuda.h on the host the way the kernels use it, compiled as plain C++
// (the __host__ branches of the header; nvcc hands those to the same host compiler).
#define __host__
#define __device__
#define __forceinline__ inline
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include "dfp_cuda.h"
using namespace dfp;

template <class T> static std::vector<T> load(const char* path, size_t count) {
  std::vector<T> v(count);
  FILE* f = fopen(path, "rb");
  if (!f || fread(v.data(), sizeof(T), count, f) != count) { fprintf(stderr, "cannot read %s\n", path); exit(2); }
  fclose(f);
  return v;
}
template <class T> static void save(const char* path, const std::vector<T>& v) {
  FILE* f = fopen(path, "wb");
  fwrite(v.data(), sizeof(T), v.size(), f);
  fclose(f);
}

// quantize O N I mode block headroom rounding seed x.bin mantissa.bin exponent.bin
static int quantize(char** argv) {
  const int o = atoi(argv[2]), n = atoi(argv[3]), inner = atoi(argv[4]), mode = atoi(argv[5]);
  const int block = atoi(argv[6]), headroom = atoi(argv[7]), rounding = atoi(argv[8]);
  const u64 seed = strtoull(argv[9], nullptr, 10);
  const int count = o * n * inner;
  const int groups = mode == 0 ? 1 : mode == 1 ? n : o * ((n + block - 1) / block) * inner;
  std::vector<float> x = load<float>(argv[10], count);
  std::vector<int> amax(groups, 0), exponent(groups);
  for (int idx = 0; idx < count; ++idx) {
    int& m = amax[group_of(idx, mode, n, inner, block)];
    m = m > int(abs_bits(x[idx])) ? m : int(abs_bits(x[idx]));
  }
  for (int g = 0; g < groups; ++g) {
    if (u32(amax[g]) >= kNonFiniteBits) return 3;
    exponent[g] = group_exponent(u32(amax[g]), headroom);
  }
  std::vector<short> q(count);
  const float limit = float(max_mantissa(headroom));
  for (int idx = 0; idx < count; ++idx) {
    const Scale s = inverse_scale(exponent[group_of(idx, mode, n, inner, block)]);
    q[idx] = quantize_one(x[idx], s, limit, rounding, u64(idx), u32(seed), u32(seed >> 32));
  }
  save(argv[11], q);
  save(argv[12], exponent);
  return 0;
}

// blocks O N I block headroom rounding seed x.bin mantissa.bin exponent.bin: mode 2 in one
// pass, as dfp_quantize_blocks's threads (I > 1) or warps (I = 1, 32 lanes) compute it,
// one after another; exit 3 where a group is non-finite.
static int blocks(char** argv) {
  const int o = atoi(argv[2]), n = atoi(argv[3]), inner = atoi(argv[4]), block = atoi(argv[5]);
  const int headroom = atoi(argv[6]), rounding = atoi(argv[7]);
  const u64 seed = strtoull(argv[8], nullptr, 10);
  const int count = o * n * inner, groups = o * ((n + block - 1) / block) * inner;
  const int lanes = inner == 1 ? 32 : 1;
  std::vector<float> x = load<float>(argv[9], count);
  std::vector<short> q(count);
  std::vector<int> exponent(groups);
  for (int g = 0; g < groups; ++g) {
    int first, length;
    block_group_span(g, n, inner, block, &first, &length);
    u32 amax = 0u;
    for (int lane = 0; lane < lanes; ++lane) {
      const u32 part = group_amax_part(x.data(), first, inner, length, lane, lanes);
      amax = part > amax ? part : amax;
    }
    if (amax >= kNonFiniteBits) return 3;
    exponent[g] = group_exponent(amax, headroom);
    for (int lane = 0; lane < lanes; ++lane)
      quantize_group_part(x.data(), first, inner, length, lane, lanes, exponent[g], headroom, rounding, u32(seed),
                          u32(seed >> 32), q.data());
  }
  save(argv[10], q);
  save(argv[11], exponent);
  return 0;
}

// The limb planes (high, low) of dfp_split_limbs for an operand of `rows` rows, strides (ld_row, ld_k).
static void limb_planes(const std::vector<short>& x, int rows, i64 ld_row, i64 ld_k, const std::vector<int>& tiles,
                        std::vector<signed char>& high, std::vector<signed char>& low) {
  const int tile_count = int(tiles.size() / 4);
  high.assign(size_t(rows) * tile_count * 32, 0);
  low.assign(high.size(), 0);
  for (int row = 0; row < rows; ++row)
    for (int t = 0; t < tile_count; ++t)
      for (int first = 0; first < 32; first += 8) {
        u32 h[2], l[2];
        split_limbs_piece(x.data(), row * ld_row, ld_k, tiles[4 * t], tiles[4 * t + 1], first, h, l);
        const size_t at = (size_t(row) * tile_count + t) * 32 + first;
        memcpy(&high[at], h, 8);
        memcpy(&low[at], l, 8);
      }
}

// gemm path M N K KB kblock chain tiles a.bin b.bin ra.bin rb.bin sa.bin sb.bin tiles.bin bias.bin out.bin
// path "mma": balanced int8 limbs summed per k tile, pieces combined modulo 2^32 (gemm_mma.cu);
// path "planes": the same from the limb planes of dfp_split_limbs (gemm_mma_pipelined.cu);
// path "int16": int32 sums per chain (gemm_int16.cu).
static int gemm(char** argv) {
  const bool planes = strcmp(argv[2], "planes") == 0;
  const bool mma = planes || strcmp(argv[2], "mma") == 0;
  const int m = atoi(argv[3]), n = atoi(argv[4]), k = atoi(argv[5]), kb = atoi(argv[6]);
  const int kblock = atoi(argv[7]), chain = atoi(argv[8]), tile_count = atoi(argv[9]);
  std::vector<short> a = load<short>(argv[10], size_t(m) * k), b = load<short>(argv[11], size_t(k) * n);
  std::vector<int> ra = load<int>(argv[12], m), rb = load<int>(argv[13], n);
  std::vector<float> sa = load<float>(argv[14], size_t(m) * kb), sb = load<float>(argv[15], size_t(kb) * n);
  std::vector<int> tiles = load<int>(argv[16], size_t(tile_count) * 4);
  std::vector<float> bias = load<float>(argv[17], n), out(size_t(m) * n);
  std::vector<signed char> a_high, a_low, b_high, b_low;  // B's planes are those of B transposed
  if (planes) limb_planes(a, m, k, 1, tiles, a_high, a_low), limb_planes(b, n, 1, n, tiles, b_high, b_low);
  for (int row = 0; row < m; ++row) {
    for (int col = 0; col < n; ++col) {
      auto add_chain_sum = [&](float acc, i32 chain_sum, int blk) {  // as both kernels do
        if (kb == 1) return add_chain(acc, chain_sum);
        return add_chain(acc, chain_sum, mul_rn(sa[row * kb + blk], sb[blk * n + col]));
      };
      float acc = 0.0f;
      if (mma) {
        u32 running = 0;
        for (int t = 0; t < tile_count; ++t) {
          i32 hh = 0, mid = 0, ll = 0;
          if (planes) {  // all 32 limbs of the tile: the padding is zeros
            for (int kk = 0; kk < 32; ++kk) {
              const size_t x = (size_t(row) * tile_count + t) * 32 + kk, y = (size_t(col) * tile_count + t) * 32 + kk;
              hh += a_high[x] * b_high[y];
              mid += a_high[x] * b_low[y] + a_low[x] * b_high[y];
              ll += a_low[x] * b_low[y];
            }
          }
          for (int kk = tiles[4 * t]; !planes && kk < tiles[4 * t] + tiles[4 * t + 1]; ++kk) {
            const i32 x = a[size_t(row) * k + kk], y = b[size_t(kk) * n + col];
            hh += limb_high(x) * limb_high(y);
            mid += limb_high(x) * limb_low(y) + limb_low(x) * limb_high(y);
            ll += limb_low(x) * limb_low(y);
          }
          running += combine_limbs(hh, mid, ll);
          if (tiles[4 * t + 2]) {
            acc = add_chain_sum(acc, i32(running), tiles[4 * t + 3]);
            running = 0;
          }
        }
      } else {
        i32 sum = 0;
        for (int kk = 0; kk < k; ++kk) {
          sum += i32(a[size_t(row) * k + kk]) * i32(b[size_t(kk) * n + col]);
          const int in_block = kk % kblock;
          if (kk + 1 == k || in_block + 1 == kblock || (in_block + 1) % chain == 0) {
            acc = add_chain_sum(acc, sum, kk / kblock);
            sum = 0;
          }
        }
      }
      out[size_t(row) * n + col] = add_rn(scale_result(acc, ra[row] + rb[col]), bias[col]);
    }
  }
  save(argv[18], out);
  return 0;
}

// scales lines blocks line_stride block_stride e.bin r.bin s.bin: dfp_gemm_scales's lines,
// one after another, each as a warp's 32 lanes share it; s written (lines, blocks) row-major.
static int scales(char** argv) {
  const int lines = atoi(argv[2]), blocks = atoi(argv[3]), line_stride = atoi(argv[4]), block_stride = atoi(argv[5]);
  std::vector<int> e = load<int>(argv[6], size_t(lines - 1) * line_stride + size_t(blocks - 1) * block_stride + 1);
  std::vector<int> r(lines);
  std::vector<float> s(size_t(lines) * blocks);
  for (int line = 0; line < lines; ++line) {
    const int* e_line = e.data() + size_t(line) * line_stride;
    int top = line_max_part(e_line, blocks, block_stride, 0, 32);
    for (int lane = 1; lane < 32; ++lane) top = std::max(top, line_max_part(e_line, blocks, block_stride, lane, 32));
    r[line] = top;
    for (int lane = 0; lane < 32; ++lane)
      line_scales_part(e_line, blocks, block_stride, top, &s[size_t(line) * blocks], 1, lane, 32);
  }
  save(argv[7], r);
  save(argv[8], s);
  return 0;
}

int main(int argc, char** argv) {
  if (argc > 1 && strcmp(argv[1], "quantize") == 0 && argc == 13) return quantize(argv);
  if (argc > 1 && strcmp(argv[1], "blocks") == 0 && argc == 12) return blocks(argv);
  if (argc > 1 && strcmp(argv[1], "gemm") == 0 && argc == 19) return gemm(argv);
  if (argc > 1 && strcmp(argv[1], "scales") == 0 && argc == 9) return scales(argv);
  fprintf(stderr, "usage: quantize ... | blocks ... | gemm ... | scales ...\n");
  return 2;
}
"""


CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@pytest.fixture(scope="module")
def host_program(tmp_path_factory):
    """dfp_cuda.h's numerics compiled for the CPU as a program. -ffp-contract=off: no fused
    multiply-adds, as on the device (__fmul_rn, __fadd_rn)."""
    if CXX is None:
        pytest.skip("no C++ compiler: cannot build the host check of dfp_cuda.h")
    work = tmp_path_factory.mktemp("host_check")
    (work / "host_check.cpp").write_text(HOST_PROGRAM)
    exe = work / "host_check"
    command = [CXX, "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror", f"-I{source_dir()}",
               "-o", str(exe), str(work / "host_check.cpp")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{CXX} failed:\n{done.stderr}"
    return exe, work


def _run(exe: Path, *args) -> None:
    done = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


QUANTIZE_CASES = {
    "tensor": ((1, 300, 1), 0, 0),
    "channel": ((7, 5, 9), 1, 0),
    "block": ((3, 70, 4), 2, 32),
    "block, last short": ((2, 37, 1), 2, 8),
    "block of 70, last axis": ((3, 150, 1), 2, 70),  # a warp's lanes wrap its run
}


@pytest.mark.parametrize("headroom", [0, 2, 5])
@pytest.mark.parametrize("rounding", [0, 1, 2], ids=["nearest", "stochastic", "dithered"])
@pytest.mark.parametrize("case", QUANTIZE_CASES)
def test_header_quantizes_like_the_reference(host_program, case, rounding, headroom):
    exe, work = host_program
    shape, mode, block = QUANTIZE_CASES[case]
    x = wide_range(shape, seed=3)
    x.view(-1)[:3] = torch.tensor([0.0, 2.0**-149, -(2.0**100)])  # a zero, the smallest subnormal, a huge value
    if mode == 2:
        x[0, :block] = 0.0  # a group of zeros
    seed = -(2**62) + 12345  # negative, as torch.randint draws them
    x.numpy().tofile(work / "x.bin")
    _run(exe, "quantize", *shape, mode, block, headroom, rounding, seed & (2**64 - 1),
         work / "x.bin", work / "q.bin", work / "e.bin")  # fmt: skip
    want_q, want_e = reference.quantize3d(x, mode, block, headroom, rounding, seed)
    got_q = torch.from_numpy(np.fromfile(work / "q.bin", dtype=np.int16)).view(shape)
    got_e = torch.from_numpy(np.fromfile(work / "e.bin", dtype=np.int32))
    assert torch.equal(got_q, want_q)
    assert torch.equal(got_e, want_e.reshape(-1))


@pytest.mark.parametrize("headroom", [0, 2])
@pytest.mark.parametrize("rounding", [0, 1, 2], ids=["nearest", "stochastic", "dithered"])
@pytest.mark.parametrize("case", ["block", "block, last short", "block of 70, last axis"])
def test_header_quantizes_blocks_in_one_pass_like_the_reference(host_program, case, rounding, headroom):
    """dfp_quantize_blocks's arithmetic (maximum, exponent, mantissas of each group in one
    pass, a thread's or a warp's lanes over it): the reference's bits; a group holding NaN
    or Inf is refused."""
    exe, work = host_program
    shape, _, block = QUANTIZE_CASES[case]
    x = wide_range(shape, seed=4)
    x.view(-1)[:3] = torch.tensor([0.0, 2.0**-149, -(2.0**100)])
    x[0, :block] = 0.0  # a group of zeros
    seed = -(2**62) + 777
    x.numpy().tofile(work / "xb.bin")
    args = (*shape, block, headroom, rounding, seed & (2**64 - 1), work / "xb.bin", work / "qb.bin", work / "eb.bin")
    _run(exe, "blocks", *args)
    want_q, want_e = reference.quantize3d(x, 2, block, headroom, rounding, seed)
    assert torch.equal(torch.from_numpy(np.fromfile(work / "qb.bin", dtype=np.int16)).view(shape), want_q)
    assert torch.equal(torch.from_numpy(np.fromfile(work / "eb.bin", dtype=np.int32)), want_e.reshape(-1))
    x.view(-1)[-1] = float("nan")
    x.numpy().tofile(work / "xb.bin")
    done = subprocess.run([str(exe), "blocks", *map(str, args)], capture_output=True, check=False)
    assert done.returncode == 3


@pytest.mark.parametrize("transposed", [False, True], ids=["rows of ea", "columns of eb"])
def test_header_gemm_scales_match_exact_powers_of_two(host_program, transposed):
    """dfp_gemm_scales's lines: the maximum of each, and 2^(e - max) as fp32 from fp64's exact
    power of two: normal, subnormal down to 2^-149, zero below (2^-150 rounds to the even 0)."""
    exe, work = host_program
    g = torch.Generator().manual_seed(5)
    e = torch.randint(-400, 10, (41, 70), generator=g, dtype=torch.int32)  # more blocks than a warp's lanes
    e[torch.arange(41), torch.arange(41) * 17 % 70] = 10  # each line's maximum, anywhere ...
    e[:12, 0] = 10
    e[:6, 1:4] = torch.tensor([10 - 126, 10 - 127, 10 - 149]).repeat(6, 1)  # ... and the edges of fp32's range
    e[6:12, 1:4] = torch.tensor([10 - 150, 10 - 151, 10]).repeat(6, 1)
    lines, blocks = e.shape
    stored = e.t().contiguous() if transposed else e  # eb's layout: a line is a column
    strides = (1, lines) if transposed else (blocks, 1)
    stored.numpy().tofile(work / "se.bin")
    _run(exe, "scales", lines, blocks, *strides, work / "se.bin", work / "sr.bin", work / "ss.bin")
    got_r = torch.from_numpy(np.fromfile(work / "sr.bin", dtype=np.int32))
    got_s = torch.from_numpy(np.fromfile(work / "ss.bin", dtype=np.float32)).view(lines, blocks)
    r = e.amax(dim=1)
    assert torch.equal(got_r, r)
    assert torch.equal(got_s, exact_pow2(e - r[:, None]).float())
    assert (got_s[6:12, 1:3] == 0).all() and (got_s[:6, 3] == 2.0**-149).all()


GEMM_CASES = {
    "tensor, chains of 32": (37, 100, 19, 2, 2, None, "random"),
    "kblock 48 (tiles cut by blocks)": (9, 150, 11, 2, 2, 48, "random"),
    "kblock 7, headroom 1 (chains of 8)": (5, 60, 6, 1, 1, 7, "random"),
    "chains of 128": (6, 300, 5, 3, 3, None, "random"),
    "headroom 0": (4, 20, 3, 0, 0, None, "random"),
    "extremes, headroom 1": (8, 96, 8, 1, 1, None, "extremes"),
    "extremes, headroom 2": (8, 96, 8, 2, 2, None, "extremes"),
}


def _extremes(shape, headroom, g):
    """Only -M and M (the largest products, both signs)."""
    top = 2 ** (15 - headroom) - 1
    return ((torch.randint(0, 2, shape, generator=g) * 2 - 1) * top).to(torch.int16)


@pytest.mark.parametrize("case", GEMM_CASES)
@pytest.mark.parametrize("path", ["mma", "planes", "int16"])
def test_header_gemm_arithmetic_matches_the_reference(host_program, case, path):
    """The kernels' integer and fp32 steps, with the k tiles and scales the Python side
    passes them, on the CPU: bit-identical to dfp.reference.gemm."""
    exe, work = host_program
    m, k, n, ha, hb, kblock, values = GEMM_CASES[case]
    if path != "int16" and min(ha, hb) == 0:
        pytest.skip("headroom 0 mantissas reach beyond the balanced int8 split; the int16 path runs them")
    g = torch.Generator().manual_seed(4)
    if values == "extremes":
        a, b = _extremes((m, k), ha, g), _extremes((k, n), hb, g)
    else:
        a, b = int16_operand((m, k), ha, seed=1), int16_operand((k, n), hb, seed=2)
    kblock = kblock or k
    kb = -(-k // kblock)
    ea = torch.randint(-30, 5, (m, kb), generator=g, dtype=torch.int32)
    eb = torch.randint(-30, 5, (kb, n), generator=g, dtype=torch.int32)
    bias = torch.randn(n, generator=g)
    ra, rb = ea.amax(dim=1), eb.amax(dim=0)  # what dfp_gemm_scales makes (test above)
    sa, sb = exact_pow2(ea - ra[:, None]).float(), exact_pow2(eb - rb[None, :]).float()
    chain = reference.chain_length(ha, hb)
    # the kernel's k tiles; for chains shorter than a tile (which the kernel leaves to the
    # int16 path) one tile per chain, to check the split and recombination there too
    tiles = cuda_gemm.k_tiles(k, kblock, chain) if chain % cuda_gemm.TILE_K == 0 else _chain_tiles(k, kblock, chain)
    if path == "planes" and chain % cuda_gemm.TILE_K:
        pytest.skip("the limb planes hold k tiles of the table, which needs chains of a multiple of a tile")
    files = {"a": a, "b": b, "ra": ra, "rb": rb, "sa": sa, "sb": sb, "bias": bias}
    for name, t in files.items():
        t.contiguous().numpy().tofile(work / f"{name}.bin")
    np.asarray(tiles, dtype=np.int32).tofile(work / "tiles.bin")
    _run(exe, "gemm", path, m, n, k, kb, kblock, chain, len(tiles),
         *(work / f"{name}.bin" for name in ("a", "b", "ra", "rb", "sa", "sb")), work / "tiles.bin",
         work / "bias.bin", work / "out.bin")  # fmt: skip
    got = torch.from_numpy(np.fromfile(work / "out.bin", dtype=np.float32)).view(m, n)
    assert torch.equal(got, reference.gemm(a, ea, ha, b, eb, hb, kblock, bias))


def _chain_tiles(k: int, kblock: int, chain: int) -> list[tuple[int, int, int, int]]:
    """One tile per chain: (first k, length, ends a chain, K-block index)."""
    return [
        (c0, min(c0 + chain, b0 + kblock, k) - c0, 1, blk)
        for blk, b0 in enumerate(range(0, k, kblock))
        for c0 in range(b0, min(b0 + kblock, k), chain)
    ]
