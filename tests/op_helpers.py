"""What the op tests share: the devices and dtypes they run on, whether the compiled kernels are in
use, a per-dtype tolerance, seeded inputs."""
import os
import platform

import pytest
import torch

import fastvat
from fastvat import ops

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="CUDA is not available"))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]
COMPILED = ops.BACKEND != "reference"
# The vectorized CPU kernels run (not their ATen fallback for CPUs without AVX2, see csrc/cpu/cpu_vec.h).
CPU_KERNELS = (
    COMPILED
    and os.environ.get("FASTVAT_CPU_SIMD") != "0"
    and not (platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() == "DEFAULT")
)
needs_ops = pytest.mark.skipif(not COMPILED, reason="compiled kernels not loaded (reference backend)")


def uses_kernels(device):
    """Whether fastvat.ops runs compiled kernels (not the reference) for tensors on device."""
    return COMPILED and (device == "cpu" or fastvat.extension_info()["cuda_kernels"])


def require_kernels(device):
    """Tests that call torch.ops.fastvat.* directly need kernels for the device."""
    if not COMPILED:
        pytest.skip("compiled kernels not loaded (reference backend)")
    if device == "cuda" and not fastvat.extension_info()["cuda_kernels"]:
        pytest.skip("the extension was built without CUDA kernels")


# Relative tolerance per dtype: about two units in the last place of the output dtype.
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def assert_close(actual, expected, dtype, scale=None):
    """Element-wise |a - e| <= rtol * |e| + atol, atol = rtol * 1e-2 * max|e| (or * scale), but at
    least two steps of the dtype's subnormal spacing (tiny gradients of half types are subnormal)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, (a.shape, e.shape)
    rtol = RTOL[dtype]
    big = scale if scale is not None else (e.abs().max().item() if e.numel() else 0.0)
    fi = torch.finfo(dtype)
    torch.testing.assert_close(a, e, rtol=rtol, atol=max(rtol * 1e-2 * big, 2 * fi.tiny * fi.eps), equal_nan=False)


def randn(*shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


def gather_inputs(dtype, device, ids_dtype=torch.int64, di_dtype=torch.int64):
    """(weight [11, 13], ids [3, 5] with a repeated id and the padding id 0, delta [4, 13], delta_index)."""
    g = torch.Generator().manual_seed(0)
    weight = randn(11, 13, dtype=dtype, device=device)
    delta = randn(4, 13, dtype=dtype, device=device, seed=1, scale=0.1)
    ids = torch.randint(0, 11, (3, 5), generator=g)
    ids[0, 0] = ids[2, 4] = 3  # repeated ids
    ids[1, 1] = 0  # padding row
    delta_index = torch.randint(0, 4, (3, 5), generator=g)
    return weight, ids.to(device, ids_dtype), delta, delta_index.to(device, di_dtype)
