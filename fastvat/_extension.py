"""Finds the kernels: the compiled module, else (only with FASTVAT_JIT=1) a JIT build with ninja,
else the pure-PyTorch reference.

Import never fails and never compiles unless asked: a JIT build takes minutes and needs a compiler,
which an ``import`` must not start behind the user's back. Falling back to the reference warns once.
"""
from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from fastvat import _build, _torch_internals

_STATE: dict[str, Any] = {"backend": None, "cuda": False, "error": None}
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ops_registered() -> bool:
    return hasattr(torch.ops, "fastvat") and hasattr(torch.ops.fastvat, "l2_normalize")


def _cuda_kernels_present() -> bool:
    return _torch_internals.has_kernel_for("fastvat::l2_normalize", "CUDA")


def _try_compiled() -> bool:
    try:
        from fastvat import _C  # noqa: F401  (registers torch.ops.fastvat.*)
    except ImportError as exc:
        _STATE["error"] = f"compiled module: {exc}"
        return False
    return _ops_registered()


def _try_jit() -> bool:
    csrc = _build.csrc_dir(_ROOT)
    if os.environ.get("FASTVAT_JIT") != "1":
        _STATE["error"] = (f"{_STATE['error']}; build it with `pip install --no-build-isolation -e .` "
                           "from a clone, or set FASTVAT_JIT=1 to compile it at import")
        return False
    if not os.path.isdir(csrc):
        _STATE["error"] = f"{_STATE['error']}; FASTVAT_JIT=1 but there are no kernel sources at {csrc}"
        return False
    try:
        from torch.utils import cpp_extension

        with_cuda = bool(torch.version.cuda) and torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
        cpp_extension.load(
            name="fastvat_jit_cuda" if with_cuda else "fastvat_jit",
            sources=_build.sources(_ROOT, with_cuda),
            extra_include_paths=[csrc],
            extra_cflags=_build.cxx_flags(),
            extra_cuda_cflags=_build.nvcc_flags(),
            extra_ldflags=_build.LINK_FLAGS,
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the reference
        _STATE["error"] = f"{_STATE['error']}; JIT build: {exc}"
        return False
    return _ops_registered()


def load() -> str:
    if _STATE["backend"] is not None:
        return _STATE["backend"]
    forced = os.environ.get("FASTVAT_BACKEND")
    if forced == "reference":
        _STATE["backend"] = "reference"
    elif _try_compiled():
        _STATE["backend"] = "compiled"
    elif _try_jit():
        _STATE["backend"] = "jit"
    else:
        _STATE["backend"] = "reference"
        warnings.warn(
            "fastvat: compiled kernels unavailable, using the pure-PyTorch reference "
            f"(slower, same results). Reason: {_STATE['error']}",
            RuntimeWarning,
            stacklevel=3,
        )
    _STATE["cuda"] = _STATE["backend"] != "reference" and _cuda_kernels_present()
    return str(_STATE["backend"])


def info() -> dict[str, Any]:
    load()
    return {
        "backend": _STATE["backend"],
        "cuda_kernels": _STATE["cuda"],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "openmp_threads": torch.get_num_threads(),
        "load_error": _STATE["error"],
    }
