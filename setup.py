"""Build script for the compiled part of hogwild_vllm: the torch extension `hogwild_vllm._C`.

Project metadata lives in pyproject.toml; this file only declares the extension. Layout of csrc/:

    ops.h                  launcher declarations, one per op and device
    torch_bindings.cpp     TORCH_LIBRARY(hogwild_C) schemas + CPU registrations (always built)
    cpu/*.cpp              CPU launchers (always built)
    cuda/*.cu              CUDA launchers + TORCH_LIBRARY_IMPL(hogwild_C, CUDA) (built with a CUDA toolchain
                           AND a CUDA-enabled torch)
    device/*.cuh           device/host math with no torch headers, shared by both paths

Build against the environment's torch, never an isolated one (an isolated build would fetch a different torch
from PyPI and produce a library that does not load against the one installed):

    pip install --no-build-isolation -e .          (or: make setup)

Environment:
    HOGWILD_SKIP_EXT=1        build no extension (pure-Python install; hogwild_vllm._ext then says how to build it)
    TORCH_CUDA_ARCH_LIST      CUDA archs to build for (torch's variable), e.g. "8.0;9.0"
    MAX_JOBS                  parallel compile jobs (torch's variable)
    HOGWILD_CPU_ISA=avx2      AVX2/FMA only for the CPU kernels (default `native`: AVX-512 when this CPU has it)
    HOGWILD_CPU_ISA=generic   no vector ISA flags for the CPU kernels
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
EXT_NAME = "hogwild_vllm._C"
# -fopenmp: at::parallel_for is an OpenMP region compiled into this extension (ATen's header); without the flag
# the region is ignored and the CPU ops run on one thread whatever torch.get_num_threads() says. Linked with
# -fopenmp too; the libgomp that torch already loaded (same soname) is the one that runs it.
CXX_FLAGS = ["-O3", "-Wall", "-Wno-unused-function", "-fopenmp", "-ffp-contract=fast"]
LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]


def _say(message: str) -> None:
    print(f"[hogwild_vllm setup] {message}", file=sys.stderr, flush=True)


def _cpu_isa_flags() -> list[str]:
    """Vector ISA flags for the CPU kernels, from what the build machine has (x86-64; the extension is built where
    it runs, `pip install -e .`): AVX-512 (16 fp32 lanes) when present, else AVX2 + FMA + F16C (8 lanes).
    HOGWILD_CPU_ISA: `native` (the default), `avx2` (no AVX-512, e.g. a build that must also run on a CPU
    without it), or `generic` (no flags: any x86-64)."""
    isa = os.environ.get("HOGWILD_CPU_ISA", "native")
    if isa not in ("native", "avx2", "generic"):
        raise SystemExit(f"HOGWILD_CPU_ISA={isa!r}: expected native, avx2 or generic")
    if isa == "generic" or platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    out = ["-mavx2", "-mfma", "-mf16c"] if {"avx2", "fma", "f16c"} <= flags else []
    if out and isa == "native" and {"avx512f", "avx512bw"} <= flags:
        out += ["-mavx512f", "-mavx512bw"]
    return out


def _sources(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in CSRC.glob(pattern))


def _extension_build() -> tuple[list, dict]:
    """Returns (ext_modules, cmdclass): empty when the build is skipped, with the reason printed."""
    if os.environ.get("HOGWILD_SKIP_EXT") == "1":
        _say(f"HOGWILD_SKIP_EXT=1: not building {EXT_NAME}; ops from it will be unavailable.")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _say(
            f"torch is not importable in the build environment: not building {EXT_NAME}. "
            "Install torch first, then build with `pip install --no-build-isolation -e .` (or `make setup`)."
        )
        return [], {}

    sources = _sources("torch_bindings.cpp") + _sources("cpu/*.cpp")
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        sources += _sources("cuda/*.cu")
        _say(f"building {EXT_NAME} with CPU and CUDA kernels (CUDA {torch.version.cuda}, {cpp_extension.CUDA_HOME})")
        extension_cls = cpp_extension.CUDAExtension
    else:
        reason = "torch is a CPU build" if torch.version.cuda is None else "no CUDA toolchain found (CUDA_HOME)"
        _say(f"building {EXT_NAME} with CPU kernels only: {reason}")
        extension_cls = cpp_extension.CppExtension

    define = ["-DHOGWILD_WITH_CUDA"] if with_cuda else []
    extension = extension_cls(
        name=EXT_NAME,
        sources=sources,
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": CXX_FLAGS + _cpu_isa_flags() + define, "nvcc": NVCC_FLAGS + define},
        extra_link_args=LINK_FLAGS,
        # The module only loads the library (ops are reached via torch.ops.hogwild_C), so the stable ABI suffices.
        py_limited_api=True,
    )
    return [extension], {"build_ext": cpp_extension.BuildExtension}  # uses ninja when installed


ext_modules, cmdclass = _extension_build()

setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
