"""Builds fastvat._C: CPU kernels always, CUDA kernels when torch is a CUDA build and nvcc exists.

FASTVAT_CUDA=0|1 forces the CUDA part off or on. No GPU is needed to compile: set
TORCH_CUDA_ARCH_LIST (default here "8.0;9.0") and, if nvcc is a wrapper, CUDA_HOME.
Install with `pip install --no-build-isolation -e .` after torch, so the extension is
built against the torch you run.
"""
import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _real_cuda_home():
    """The toolkit root that holds bin/nvcc and lib64/libcudart (nvcc on PATH may be a wrapper)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/usr/local/cuda"]
    for root in candidates:
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")) and glob.glob(
            os.path.join(root, "lib*", "libcudart.so*")
        ):
            return root
    return None


def _want_cuda(torch):
    forced = os.environ.get("FASTVAT_CUDA")
    if forced == "0":
        return False
    home = _real_cuda_home() if torch.version.cuda else None
    if forced == "1" and home is None:
        raise RuntimeError("FASTVAT_CUDA=1 but torch is not a CUDA build or no CUDA toolkit (nvcc) was found")
    if home is None:
        return False
    os.environ["CUDA_HOME"] = home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    return True


def _extensions():
    import torch
    from torch.utils import cpp_extension

    with_cuda = _want_cuda(torch)
    if with_cuda:
        # cpp_extension read CUDA_HOME at import; point it at the real toolkit.
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    sources = ["csrc/fastvat.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp"]  # no -std: torch adds the one it needs (c++20 for torch >= 2.13)
    kwargs = dict(
        name="fastvat._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        kwargs["sources"] = sources + sorted(glob.glob("csrc/cuda/*.cu"))
        kwargs["extra_compile_args"] = {
            "cxx": cxx + ["-DFASTVAT_WITH_CUDA"],
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
        }
        return [cpp_extension.CUDAExtension(**kwargs)], cpp_extension.BuildExtension
    kwargs["extra_compile_args"] = {"cxx": cxx}
    return [cpp_extension.CppExtension(**kwargs)], cpp_extension.BuildExtension


ext_modules, build_ext = _extensions()
setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext.with_options(use_ninja=True)},
)
