"""Builds fastvat._C: CPU kernels always, CUDA kernels when torch is a CUDA build and nvcc exists.

FASTVAT_CUDA=0|1 forces the CUDA part off or on. FASTVAT_BENCH_OPS=1 adds the benchmark-only ops
(fastvat/_build.py: bench_ops). No GPU is needed to compile: set
TORCH_CUDA_ARCH_LIST (default here "8.0;9.0") and, if nvcc is a wrapper, CUDA_HOME.
Install with `pip install --no-build-isolation -e .` after torch, so the extension is
built against the torch you run.
"""
import glob
import importlib.util
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


def _build_config():
    """fastvat/_build.py, loaded from its file: importing the package would load the kernels being built."""
    spec = importlib.util.spec_from_file_location("fastvat_build", os.path.join(ROOT, "fastvat", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    import torch
    from torch.utils import cpp_extension

    cfg = _build_config()
    with_cuda = _want_cuda(torch)
    if with_cuda:
        # cpp_extension read CUDA_HOME at import; point it at the real toolkit.
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    kwargs = dict(
        name="fastvat._C",
        sources=[os.path.relpath(p, ROOT) for p in cfg.sources(ROOT, with_cuda)],
        include_dirs=[cfg.csrc_dir(ROOT)],
        extra_link_args=cfg.LINK_FLAGS,
        extra_compile_args={"cxx": cfg.cxx_flags()},
    )
    if with_cuda:
        kwargs["extra_compile_args"]["nvcc"] = cfg.nvcc_flags()
        return [cpp_extension.CUDAExtension(**kwargs)], cpp_extension.BuildExtension
    return [cpp_extension.CppExtension(**kwargs)], cpp_extension.BuildExtension


ext_modules, build_ext = _extensions()
setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext.with_options(use_ninja=True)},
)
