"""Builds fastvat_emu: the CUDA kernels of csrc/cuda/ compiled as C++ against the emulator in this
folder (fvemu.h, force-included), registered as torch.ops.fastvat_emu.* for CPU tensors.

Test-only: the shipped extension never includes any of this. One translation unit per .cu file
(kernels/*.cpp) plus the schema (kernels/schema.cpp), built by ninja through
torch.utils.cpp_extension.load into build/cuda_emu/<name>/, so a second build only recompiles what
changed (ninja tracks the headers). -O1: the emulated kernels need some optimisation to run fast enough, -O2 costs compile
time for little.

    python tests/cuda_emu/build.py                    # the test build (what the pytest fixture loads)
    python tests/cuda_emu/build.py --variant asan     # AddressSanitizer + UndefinedBehaviorSanitizer
    python tests/cuda_emu/build.py --variant coverage # gcov instrumentation of csrc/cuda/

Prints the path of the built library. FVEMU_LIB=<that path> makes the tests load it instead of
building their own.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
OPS = ("l2_normalize", "perturb", "kl_div", "embedding_gather_add")

VARIANTS = {
    "default": ([], []),
    "asan": (["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"],
             ["-fsanitize=address,undefined"]),
    # -O0: line counts that map onto the source (no inlining or merged lines)
    "coverage": (["--coverage", "-O0", "-fno-inline"], ["--coverage"]),
}


def build(variant: str = "default", csrc: str | None = None, build_dir: str | None = None,
          ops=OPS, verbose: bool = False) -> str:
    """Compiles (or brings up to date) the emulated kernels of `ops` from `csrc` (default: the repo's)
    and returns the path of the shared library. Does not load it."""
    from torch.utils import cpp_extension

    csrc = os.path.abspath(csrc or os.path.join(REPO, "csrc"))
    name = "fastvat_emu" if variant == "default" else f"fastvat_emu_{variant}"
    build_dir = os.path.abspath(build_dir or os.path.join(REPO, "build", "cuda_emu", name))
    os.makedirs(build_dir, exist_ok=True)
    cflags, ldflags = VARIANTS[variant]
    sources = [os.path.join(HERE, "kernels", "schema.cpp")] + [os.path.join(HERE, "kernels", f"{op}.cpp") for op in ops]
    # ninja through cpp_extension's builder: incremental (header dependencies included), and it only
    # builds, while load() would also load the library into this process
    cpp_extension._write_ninja_file_and_build_library(
        name=name,
        sources=sources,
        extra_cflags=["-O1", "-g1", "-include", os.path.join(HERE, "fvemu.h"), "-DFASTVAT_CUDA_EMU",
                      "-DFASTVAT_BENCH_OPS", "-Wno-unused-function"] + cflags,
        extra_cuda_cflags=None,
        extra_sycl_cflags=None,
        extra_ldflags=ldflags,
        extra_include_paths=[os.path.join(HERE, "include"), HERE, csrc],
        build_directory=build_dir,
        verbose=verbose,
        with_cuda=False,
        with_sycl=False,
    )
    path = os.path.join(build_dir, name + ".so")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="default")
    ap.add_argument("--csrc", help="kernel sources (default: the repo's csrc/)")
    ap.add_argument("--build-dir")
    ap.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ",".join(OPS))
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    path = build(a.variant, a.csrc, a.build_dir, tuple(a.ops.split(",")), a.verbose)
    print(f"built in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
