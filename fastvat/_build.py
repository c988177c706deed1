"""What the kernels are built from: one list of sources and flags for setup.py and the JIT build.

Loaded by setup.py straight from its file (not through ``import fastvat``, which would try to load the
kernels being built), so it imports nothing but the standard library.
"""
from __future__ import annotations

import glob
import os

CXX_FLAGS = ["-O3", "-fopenmp"]  # no -std: torch adds the one it needs (c++20 for torch >= 2.13)
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
LINK_FLAGS = ["-fopenmp"]


def csrc_dir(root: str) -> str:
    return os.path.join(root, "csrc")


def sources(root: str, with_cuda: bool) -> list:
    """The schema file, the CPU kernels and (with_cuda) the CUDA kernels, as paths under root."""
    csrc = csrc_dir(root)
    found = [os.path.join(csrc, "fastvat.cpp")] + sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    if with_cuda:
        found += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
    return found


def bench_ops() -> bool:
    """FASTVAT_BENCH_OPS=1 at build time adds the benchmark-only ops (_kl_div_with_logits_variant),
    which benchmarks and their tests use; user builds leave them out."""
    return os.environ.get("FASTVAT_BENCH_OPS") == "1"


def _defines() -> list:
    return ["-DFASTVAT_BENCH_OPS"] if bench_ops() else []


def cxx_flags() -> list:
    return list(CXX_FLAGS) + _defines()


def nvcc_flags() -> list:
    return list(NVCC_FLAGS) + _defines()
