"""The native extension's build recipe, in one place: its sources, compiler and linker flags, and
the key of the just-in-time build's cache folder.

Read by both builds: the just-in-time one (fpt_fast.ops.native_backend) imports this module, and
setup.py's ahead-of-time one loads this file by path, before torch or fpt_fast can be imported, so
it imports nothing but the standard library.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Iterable, Tuple

CPU_SOURCES = ("registration.cpp", "cpu_math.cpp", "cpu_attention.cpp", "cpu_select.cpp")
CUDA_SOURCES = ("cuda_select.cu",)
# Headers the sources include: part of the cache key, so that editing one rebuilds.
HEADERS = ("cpu_math.h", "fpt_native.h", "select_key.h")
# -ffp-contract=fast lets the vector bodies use FMA (-std=c++17 alone turns contraction off);
# -Wno-psabi silences GCC's notes about passing vector types between inlined helpers; -fopenmp (at
# compile and link time) makes at::parallel_for, an inline OpenMP loop in torch's headers, run on
# every core instead of one.
OPENMP_FLAGS = ("-fopenmp",) if sys.platform.startswith("linux") else ()
CXX_FLAGS = ("-O3", "-ffp-contract=fast", "-Wno-psabi") + OPENMP_FLAGS
LINK_FLAGS = OPENMP_FLAGS
NVCC_FLAGS = ("-O3", "--use_fast_math")


def sources(with_cuda: bool) -> Tuple[str, ...]:
    """File names, relative to csrc/, of the CPU-only or the CPU + CUDA build."""
    return CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())


def cache_key(source_dir: Path, with_cuda: bool, include_paths: Iterable[str], versions: Iterable[str]) -> str:
    """16 hex digits naming one build: a hash of the sources' and headers' contents, the flags, the
    include paths (two environments with the same versions have different ones) and the versions
    given (torch, Python, CUDA, the compiler...)."""
    digest = hashlib.sha256()
    for name in sorted(sources(with_cuda) + HEADERS):
        digest.update(name.encode() + b"\0" + (source_dir / name).read_bytes() + b"\0")
    for part in (*CXX_FLAGS, "|", *LINK_FLAGS, "|", *(NVCC_FLAGS if with_cuda else ()), "|",
                 *include_paths, "|", *versions):
        digest.update(str(part).encode() + b"\0")
    return digest.hexdigest()[:16]
