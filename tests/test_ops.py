"""The fused ops against fastvat.reference: every op x dtype x norm/reduction, awkward shapes,
gradients (gradcheck in float64), torch.library.opcheck, and argument checking.

Device is a parameter: the CUDA cases run when a GPU is visible (the same file is the CUDA suite).
"""
import glob
import math
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fastvat
from fastvat import ops
from fastvat import reference as ref

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


# ---------------------------------------------------------------------------------------------
# l2_normalize
# ---------------------------------------------------------------------------------------------
def _l2_case(case, dtype, device):
    """(x, baseline, mask) for a named case. Masks include all-masked samples / rows."""
    if case == "3d_mask_baseline":  # [B, T, H] with a [B, T] mask; sample 1 fully masked
        x, b = randn(4, 6, 7, dtype=dtype, device=device), randn(4, 6, 7, dtype=dtype, device=device, seed=1)
        m = torch.rand(4, 6, generator=torch.Generator().manual_seed(2)) > 0.3
        m[1] = False
        return x, b, m.to(device)
    if case == "odd_1023":  # a row length that is not a multiple of any vector width
        return randn(3, 1023, dtype=dtype, device=device), None, None
    if case == "noncontig":  # transposed x, sliced baseline, bool mask over dim 0
        x = randn(9, 5, dtype=dtype, device=device).t()
        b = randn(5, 18, dtype=dtype, device=device, seed=1)[:, ::2]
        m = torch.tensor([1, 0, 1, 1, 1], dtype=torch.bool, device=device)
        return x, b, m
    if case == "elementwise_mask":  # mask of x's full shape (one entry per element), 0/1 floats
        x = randn(3, 4, 37, dtype=dtype, device=device)
        m = (torch.rand(3, 4, 37, generator=torch.Generator().manual_seed(3)) > 0.5).float()
        return x, None, m.to(device)
    if case == "large_groups":  # groups longer than the reduction chunk, one-task-per-group path
        x = randn(5, 3, 11001, dtype=dtype, device=device)
        m = torch.ones(5, 3, dtype=torch.bool, device=device)
        m[2] = False
        m[3, 1] = False
        return x, None, m
    if case == "two_large_groups":  # fewer large groups than threads*2: partial-sum + scale passes
        return randn(2, 40000, dtype=dtype, device=device), randn(2, 40000, dtype=dtype, device=device, seed=1), None
    raise AssertionError(case)


L2_CASES = ["3d_mask_baseline", "odd_1023", "noncontig", "elementwise_mask", "large_groups", "two_large_groups"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("norm", ["global", "sample", "token"])
@pytest.mark.parametrize("case", L2_CASES)
def test_l2_normalize_matches_reference(device, dtype, norm, case):
    x, b, m = _l2_case(case, dtype, device)
    out = ops.l2_normalize(x, scale=2.5, norm=norm, mask=m, baseline=b)
    mref = None if m is None else m.to(dtype).expand(x.shape[: m.dim()])
    expected = ref.l2_normalize(x, scale=2.5, norm=norm, mask=mref, baseline=b)
    assert out.dtype == dtype and out.shape == x.shape
    if uses_kernels(device):
        assert out.is_contiguous()
    assert torch.isfinite(out).all()
    assert_close(out, expected, dtype)
    # the scale is honoured: the norm of every group with a non-zero v is 2.5
    v = out.double().reshape(-1)
    if norm == "global" and v.abs().sum() > 0:
        assert abs(v.norm().item() - 2.5) < 2.5 * 50 * RTOL[dtype] + 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_l2_normalize_zero_norm_groups_give_zeros(device, dtype):
    x = randn(3, 4, 5, dtype=dtype, device=device)
    x[1] = 0  # a zero sample
    x[2, 3] = 0  # a zero token
    for norm in ("sample", "token"):
        out = ops.l2_normalize(x, norm=norm)
        assert torch.isfinite(out).all()
        assert (out[1] == 0).all()
        if norm == "token":
            assert (out[2, 3] == 0).all() and (out[0].abs().sum(-1) > 0).all()
    out = ops.l2_normalize(torch.zeros(7, 3, dtype=dtype, device=device), norm="global")
    assert torch.isfinite(out).all() and (out == 0).all()
    # everything masked
    out = ops.l2_normalize(x, norm="global", mask=torch.zeros(3, dtype=torch.bool, device=device))
    assert torch.isfinite(out).all() and (out == 0).all()
    # baseline equal to x
    out = ops.l2_normalize(x, norm="sample", baseline=x.clone())
    assert torch.isfinite(out).all() and (out == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", ["global", "sample", "token"])
def test_l2_normalize_tiny_and_empty(device, norm):
    for shape in [(0, 5), (4, 0), (1,), (1, 1), (2, 3, 0)]:
        x = randn(*shape, device=device)
        out = ops.l2_normalize(x, scale=3.0, norm=norm)
        assert out.shape == x.shape
        assert_close(out, ref.l2_normalize(x, scale=3.0, norm=norm), torch.float32)
    out = ops.l2_normalize(torch.tensor([-2.0], device=device), scale=3.0, norm=norm)
    assert out.item() == -3.0
    if norm == "global":
        out = ops.l2_normalize(torch.tensor(-2.0, device=device), scale=3.0, norm=norm)  # 0-dim
        assert out.shape == () and out.item() == -3.0


@pytest.mark.skipif(not CPU_KERNELS, reason="vectorized CPU kernels not in use")
@pytest.mark.parametrize("norm", ["global", "sample", "token"])
def test_l2_normalize_independent_of_thread_count(norm):
    """Partial sums use fixed chunks: 1, 2 and 3 threads give bit-identical results."""
    x = randn(3, 50001)
    m = torch.tensor([True, False, True])
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(ops.l2_normalize(x, norm=norm, mask=m))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", ["global", "sample", "token"])
def test_l2_normalize_gradcheck(device, norm):
    x = randn(3, 4, 5, dtype=torch.float64, device=device).requires_grad_()
    b = randn(3, 4, 5, dtype=torch.float64, device=device, seed=1).requires_grad_()
    m = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool, device=device)
    assert torch.autograd.gradcheck(lambda x, b: ops.l2_normalize(x, scale=1.7, norm=norm, mask=m, baseline=b), (x, b))
    assert torch.autograd.gradcheck(lambda x: ops.l2_normalize(x, scale=0.3, norm=norm), (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_l2_normalize_backward_non_unit_grad_output(device, dtype):
    x = randn(4, 6, 9, dtype=dtype, device=device).requires_grad_()
    m = torch.rand(4, 6, generator=torch.Generator().manual_seed(1)).to(device) > 0.3
    go = randn(4, 6, 9, dtype=dtype, device=device, seed=5, scale=3.0)
    (gx,) = torch.autograd.grad(ops.l2_normalize(x, scale=2.0, norm="sample", mask=m), x, go)
    x2 = x.detach().clone().requires_grad_()
    (gr,) = torch.autograd.grad(ref.l2_normalize(x2, scale=2.0, norm="sample", mask=m.to(dtype)), x2, go)
    assert_close(gx, gr, dtype)


# ---------------------------------------------------------------------------------------------
# perturb_ / restore_
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_perturb_semantics(device, dtype):
    w0 = randn(37, 23, dtype=dtype, device=device)
    d1, d2 = randn(37, 23, device=device, seed=1, dtype=dtype), randn(37, 23, device=device, seed=2, dtype=dtype)
    ulp = torch.finfo(dtype).eps * w0.abs().max().item()  # one rounding of a weight-sized value

    def close(a, e, roundings):
        torch.testing.assert_close(a.double().cpu(), e.double().cpu(), rtol=0, atol=roundings * ulp)

    w = w0.clone()
    new1 = ops.perturb_(w, d1, scale=1.5)  # fresh buffer
    expected1 = ref.l2_normalize(d1, scale=1.5, norm="global")
    assert new1.dtype == dtype and new1.shape == w0.shape
    assert_close(new1, expected1, dtype)
    close(w, w0.double() + expected1.double(), 1)

    # second step reuses the buffer: previous is overwritten with the new perturbation and returned
    ptr = new1.data_ptr()
    w_ref, prev_ref = w.clone(), new1.clone()
    new2 = ops.perturb_(w, d2, scale=0.5, previous=new1)
    assert new2 is new1 and new2.data_ptr() == ptr
    ref.perturb_(w_ref, d2, 0.5, previous=prev_ref)
    assert_close(new2, prev_ref, dtype)
    close(w, w_ref, 2)
    # weight is w0 + new2 up to rounding; restore_ takes it back to w0 up to rounding
    close(w, w0.double() + new2.double(), 3)
    ops.restore_(w, new2)
    close(w, w0, 4)


def exact_norm_direction(n, mags, g):
    """n random signs times magnitudes drawn from ``mags`` (small dyadic numbers): the sum of squares
    is exact in float32 in any order, so every backend computes the same norm factor."""
    mags = torch.tensor(mags)
    return mags[torch.randint(0, len(mags), (n,), generator=g)] * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_perturb_16bit_rounding_is_exact(device, dtype):
    """delta = round(direction * f) bit for bit as torch rounds float32 -> dtype (nearest even,
    ties included), and weight = round(weight + delta) for a zero start; f = scale / ||direction||
    is made exact: every |direction| is a small dyadic number, so the norm's partial sums are exact."""
    g = torch.Generator().manual_seed(0)
    n = 3 * 16384 + 77  # several reduction chunks and a vector tail
    d = exact_norm_direction(n, [1.0, 1.5, 1.25, 1.75, 0.5, 0.75, 2.0, 1.125], g).to(dtype)
    # 1 + 2**-8 (+ 2**-11 for fp16) is halfway between two bf16 (fp16) neighbours of 1: d = 1 is a tie
    f = 1.0 + 2.0 ** -8 if dtype == torch.bfloat16 else 1.0 + 2.0 ** -11
    norm = d.double().norm().item()
    scale = f * norm
    assert float(torch.tensor(scale / norm, dtype=torch.float32)) == f
    w = torch.zeros(n, dtype=dtype, device=device)
    dd = d.to(device)
    new = ops.perturb_(w, dd, scale=scale)
    expected = (d.float() * f).to(dtype)
    assert torch.equal(new.cpu(), expected), (new.cpu() != expected).sum()
    assert torch.equal(w.cpu(), expected)
    # ties rounded to even: d = +-1 gives exactly +-1
    ones = d.abs() == 1
    assert bool(ones.any()) and torch.equal(new.cpu()[ones].abs(), torch.ones(int(ones.sum()), dtype=dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_perturb_out_and_strided_buffers(device):
    w0 = randn(40, 12, device=device)
    d = randn(40, 12, device=device, seed=1)
    # out= without previous
    w, out = w0.clone(), torch.full((40, 12), 7.0, device=device)
    assert ops.perturb_(w, d, scale=2.0, out=out) is out
    assert_close(out, ref.l2_normalize(d, scale=2.0), torch.float32)
    assert_close(w, w0 + out, torch.float32)
    # previous and out both given: previous is read, out receives the new value, previous untouched
    prev = randn(40, 12, device=device, seed=3, scale=0.1)
    prev_copy = prev.clone()
    w, out = w0.clone(), torch.empty(40, 12, device=device)
    assert ops.perturb_(w, d, scale=2.0, previous=prev, out=out) is out
    assert torch.equal(prev, prev_copy)
    assert_close(w, w0 + out - prev, torch.float32, scale=w0.abs().max().item())
    # non-contiguous weight (a transposed view) and previous (a strided view)
    wt = w0.t().contiguous().t()  # column-major storage
    store = torch.zeros(40, 24, device=device)
    prev_view = store[:, ::2]
    prev_view.copy_(prev)
    new = ops.perturb_(wt, d, scale=2.0, previous=prev_view)
    assert new is prev_view
    assert_close(prev_view, ref.l2_normalize(d, scale=2.0), torch.float32)
    assert_close(wt, w0 + prev_view - prev, torch.float32, scale=w0.abs().max().item())
    assert (store[:, 1::2] == 0).all()  # the gaps of the strided buffer are untouched


@pytest.mark.parametrize("device", DEVICES)
def test_perturb_op_with_strided_weight_and_delta(device):
    """The op itself (not only the wrapper) updates strided weight/delta through their views."""
    require_kernels(device)
    w0, d = randn(30, 9, device=device), randn(9, 30, device=device, seed=1).t()
    prev = randn(30, 9, device=device, seed=2, scale=0.1)
    w = w0.t().contiguous().t()
    store = torch.zeros(30, 18, device=device)
    delta = store[:, 1::2]
    delta.copy_(prev)
    torch.ops.fastvat.perturb_(w, d, delta, 0.7, True)
    new = ref.l2_normalize(d, scale=0.7)
    assert_close(delta, new, torch.float32)
    assert_close(w, w0 + new - prev, torch.float32, scale=w0.abs().max().item())
    assert (store[:, 0::2] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_perturb_direction_of_other_dtype_and_zero_direction(device):
    w0 = randn(16, 8, dtype=torch.bfloat16, device=device)
    d = randn(16, 8, device=device, seed=1)  # float32 direction for a bf16 weight
    w = w0.clone()
    new = ops.perturb_(w, d, scale=1.0)
    assert new.dtype == torch.bfloat16
    assert_close(new, ref.l2_normalize(d, norm="global").to(torch.bfloat16), torch.bfloat16)
    # normalised in the direction's precision (not rounded to bf16 first): with 11-bit values (more
    # than bf16 holds) whose sum of squares is exact in float32 in any order, every backend gets the
    # same factor, and new = round_bf16(d * f) bit for bit (a bf16-first cast changes 2 of these 16)
    k = torch.randint(-1023, 1024, (4, 4), generator=torch.Generator().manual_seed(5))
    d = (k.float() / 1024).to(device)
    w0 = randn(4, 4, dtype=torch.bfloat16, device=device)
    w = w0.clone()
    new = ops.perturb_(w, d, scale=1.0)
    f = torch.tensor(1.0 / math.sqrt(float((k.double() ** 2).sum()) / 1024**2), dtype=torch.float32)
    expected = (d.cpu() * f).to(torch.bfloat16)
    assert torch.equal(new.cpu(), expected), int((new.cpu() != expected).sum())
    assert torch.equal(w.cpu(), (w0.float() + new.float()).to(torch.bfloat16).cpu())
    w0 = randn(16, 8, dtype=torch.bfloat16, device=device)
    w = w0.clone()
    new = ops.perturb_(w, torch.zeros(16, 8, device=device), scale=1.0)
    assert torch.isfinite(new).all() and (new == 0).all() and torch.equal(w, w0)


@pytest.mark.parametrize("device", DEVICES)
def test_perturb_rounding_matches_the_reference_bit_for_bit(device):
    """16-bit weight with previous: weight = round(weight + (new - previous)), one rounding; a 16-bit
    direction for a wider weight: new is rounded to the direction's dtype first (l2_normalize's output)."""
    g = torch.Generator().manual_seed(3)
    n = 2 * 16384 + 5
    d = exact_norm_direction(n, [1.0, 1.5, 1.25, 0.75], g)
    scale = 0.37 * d.double().norm().item()
    w0 = (torch.randn(n, generator=g) * 0.05).to(torch.bfloat16)
    prev0 = (torch.randn(n, generator=g) * 0.01).to(torch.bfloat16)
    w, prev = w0.clone().to(device), prev0.clone().to(device)
    ops.perturb_(w, d.to(torch.bfloat16).to(device), scale=scale, previous=prev)
    w_ref, prev_ref = w0.clone(), prev0.clone()
    ref.perturb_(w_ref, d.to(torch.bfloat16), scale, previous=prev_ref)
    assert torch.equal(prev.cpu(), prev_ref)
    assert torch.equal(w.cpu(), w_ref), int((w.cpu() != w_ref).sum())
    expected = (w0.float() + (prev_ref.float() - prev0.float())).to(torch.bfloat16)
    assert torch.equal(w_ref, expected)
    # bf16 direction, float32 weight: delta == the bf16 result widened
    dir16 = (d * 1.001).to(torch.bfloat16)
    w32 = torch.zeros(n, device=device)
    new = ops.perturb_(w32, dir16.to(device), scale=scale)
    assert new.dtype == torch.float32
    assert torch.equal(new.cpu(), ref.l2_normalize(dir16, scale=scale, norm="global").float())


@pytest.mark.skipif(not CPU_KERNELS, reason="vectorized CPU kernels not in use")
def test_perturb_independent_of_thread_count():
    w0, d, p = randn(7, 20001), randn(7, 20001, seed=1), randn(7, 20001, seed=2, scale=0.01)
    before = torch.get_num_threads()
    res = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            w, prev = w0.clone(), p.clone()
            ops.perturb_(w, d, scale=1.0, previous=prev)
            res.append((w, prev))
    finally:
        torch.set_num_threads(before)
    for w, prev in res[1:]:
        assert torch.equal(w, res[0][0]) and torch.equal(prev, res[0][1])


# Every pair of perturb_'s tensor arguments, in the order the error message names them.
PERTURB_PAIRS = [("weight", "direction"), ("weight", "previous"), ("weight", "out"), ("direction", "previous"),
                 ("direction", "out"), ("previous", "out")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pair", PERTURB_PAIRS, ids="-".join)
def test_perturb_rejects_partially_overlapping_arguments(device, pair):
    """Two views of one buffer, one row apart: rejected, naming both, with nothing written."""
    args = {"weight": randn(8, 7, device=device), "direction": randn(8, 7, device=device, seed=1),
            "previous": randn(8, 7, device=device, seed=2), "out": torch.zeros(8, 7, device=device)}
    buf = randn(9, 7, device=device, seed=3)
    a, b = pair
    args[a], args[b] = buf[:-1], buf[1:]
    before = {k: v.clone() for k, v in args.items()}
    with pytest.raises(ValueError, match=rf"^{a} and {b} partially overlap"):
        ops.perturb_(args["weight"], args["direction"], scale=1.0, previous=args["previous"], out=args["out"])
    for k, v in args.items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["previous", "out"])
def test_perturb_rejects_weight_as_its_own_perturbation_buffer(device, name):
    w, d = randn(8, 7, device=device), randn(8, 7, device=device, seed=1)
    w0 = w.clone()
    with pytest.raises(ValueError, match=rf"^weight and {name} are the same memory"):
        ops.perturb_(w, d, scale=1.0, **{name: w.view(8, 7)})
    assert torch.equal(w, w0)


@pytest.mark.parametrize("device", DEVICES)
def test_perturb_full_aliases_and_disjoint_views_still_work(device):
    """direction may be the very memory of weight, previous or out (it is read first), out that of
    previous; views that interleave in one buffer without sharing an element are separate tensors."""
    w0, d0, prev0 = randn(8, 7, device=device), randn(8, 7, device=device, seed=1), randn(8, 7, device=device, seed=2)
    new0 = ref.l2_normalize(d0, scale=1.5)

    def check(w, new, w_expected, new_expected):
        assert_close(new, new_expected, torch.float32)
        assert_close(w, w_expected, torch.float32, scale=w0.abs().max().item())

    w = w0.clone()  # direction is weight
    new = ops.perturb_(w, w, scale=1.5)
    check(w, new, w0 + ref.l2_normalize(w0, scale=1.5), ref.l2_normalize(w0, scale=1.5))
    w, prev = w0.clone(), d0.clone()  # direction is previous
    new = ops.perturb_(w, prev, scale=1.5, previous=prev)
    check(w, new, w0 + new0 - d0, new0)
    w, d, prev = w0.clone(), d0.clone(), prev0.clone()  # direction is out, previous separate
    new = ops.perturb_(w, d, scale=1.5, previous=prev, out=d)
    assert new is d and torch.equal(prev, prev0)
    check(w, new, w0 + new0 - prev0, new0)
    w, prev = w0.clone(), prev0.clone()  # out is another view of previous's memory
    new = ops.perturb_(w, d0, scale=1.5, previous=prev, out=prev.view(8, 7))
    check(w, new, w0 + new0 - prev0, new0)
    buf = torch.stack([w0, d0], -1)  # [8, 7, 2]: weight and direction interleaved
    w, d = buf[..., 0], buf[..., 1]
    new = ops.perturb_(w, d, scale=1.5)
    check(w, new, w0 + new0, new0)
    assert torch.equal(d, d0)


# ---------------------------------------------------------------------------------------------
# kl_div_with_logits
# ---------------------------------------------------------------------------------------------
# (1, 131072) and (3, 200003) take the CPU kernel's column-span split (<= 4 rows of >= 64k classes)
KL_SHAPES = [(5, 7), (64, 1023), (3, 32000), (1, 131072), (3, 200003), (2, 3, 17), (4, 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", KL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kl_matches_reference(device, dtype, shape):
    p = randn(*shape, dtype=dtype, device=device, scale=2.0)
    q = randn(*shape, dtype=dtype, device=device, seed=1, scale=2.0).requires_grad_()
    lead = shape[:-1]
    mask = torch.rand(lead, generator=torch.Generator().manual_seed(4)) > 0.3
    mask.view(-1)[0] = True
    if mask.numel() > 1:
        mask.view(-1)[-1] = False  # at least one masked row
    mask = mask.to(device)
    rows = ops.kl_div_with_logits(p, q, mask=mask, reduction="none")
    q2 = q.detach().clone().requires_grad_()
    rows_ref = ref.kl_div_with_logits(p, q2, mask=mask, reduction="none")
    assert rows.dtype == ref.acc_dtype(dtype) and rows.shape == lead
    acc = ref.acc_dtype(dtype)
    # The loss is computed in the accumulation dtype from the same logits.
    tol = 1e-12 if acc == torch.float64 else 2e-6 * (1 + torch.log(torch.tensor(float(shape[-1]))).item())
    torch.testing.assert_close(rows.double().cpu(), rows_ref.double().cpu(), rtol=1e-4 if acc == torch.float32 else 1e-10, atol=tol)
    assert (rows[~mask] == 0).all()
    go = randn(*lead, dtype=acc, device=device, seed=7, scale=2.0)  # non-unit grad_output
    (g,) = torch.autograd.grad(rows, q, go)
    (g_ref,) = torch.autograd.grad(rows_ref, q2, go)
    assert g.dtype == dtype
    assert_close(g, g_ref, dtype)
    assert (g[~mask] == 0).all()


@pytest.mark.skipif(not CPU_KERNELS, reason="vectorized CPU kernels not in use")
def test_kl_long_rows_split_into_spans():
    """Few long rows are cut into 32768-class spans merged in order: -inf across span edges, a span
    that is all -inf, a row that is all -inf (NaN), results independent of the thread count."""
    C = 3 * 32768 + 5
    p, q = randn(2, C, scale=3.0), randn(2, C, seed=1, scale=3.0)
    p[0, 32768:65536] = float("-inf")  # a whole span with probability 0
    p[0, 32760:32776] = float("-inf")  # across a span edge
    q[0, 32760:32770] = float("-inf")
    p[1, -3:] = float("-inf")  # in the short last span
    rows_ref = ref.kl_div_with_logits(p, q, reduction="none")
    before = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            qq = q.clone().requires_grad_()
            rows = ops.kl_div_with_logits(p, qq, reduction="none")
            (g,) = torch.autograd.grad(rows.sum(), qq)
            out.append((rows, g))
    finally:
        torch.set_num_threads(before)
    for rows, g in out[1:]:
        assert torch.equal(rows, out[0][0]) and torch.equal(g, out[0][1])
    torch.testing.assert_close(out[0][0], rows_ref, rtol=1e-4, atol=1e-5)
    q2 = q.clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(ref.kl_div_with_logits(p, q2, reduction="none").sum(), q2)
    assert_close(out[0][1], g_ref, torch.float32)
    # where p = -inf and q is finite the gradient is softmax(q) > 0; where both are -inf it is 0
    assert (out[0][1][0, 32776:65536] > 0).all() and (out[0][1][0, 32760:32770] == 0).all()
    dead = p.clone()
    dead[1] = float("-inf")
    rows = ops.kl_div_with_logits(dead, q, reduction="none")
    assert torch.isnan(rows[1]) and torch.isfinite(rows[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
def test_kl_reductions(device, reduction):
    p, q = randn(6, 50, device=device, scale=3.0), randn(6, 50, device=device, seed=1, scale=3.0)
    mask = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.bool, device=device)
    for m in (None, mask):
        out = ops.kl_div_with_logits(p, q, mask=m, reduction=reduction)
        expected = ref.kl_div_with_logits(p, q, mask=m, reduction=reduction)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    if reduction == "batchmean":
        torch.testing.assert_close(
            ops.kl_div_with_logits(p, q),
            F.kl_div(F.log_softmax(q, -1), F.softmax(p, -1), reduction="batchmean"),
            rtol=1e-5,
            atol=1e-6,
        )
        # mean over unmasked rows vs batchmean over all rows differ when rows are masked
        a = ops.kl_div_with_logits(p, q, mask=mask, reduction="mean")
        b = ops.kl_div_with_logits(p, q, mask=mask, reduction="batchmean")
        torch.testing.assert_close(a * 4, b * 6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
def test_kl_gradcheck(device, reduction):
    p = randn(4, 3, 6, dtype=torch.float64, device=device)
    q = randn(4, 3, 6, dtype=torch.float64, device=device, seed=1).requires_grad_()
    mask = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 0, 0], [1, 1, 0]], dtype=torch.bool, device=device)
    assert torch.autograd.gradcheck(lambda q: ops.kl_div_with_logits(p, q, mask=mask, reduction=reduction), (q,))
    assert torch.autograd.gradcheck(lambda q: ops.kl_div_with_logits(p, q, reduction=reduction), (q,))


@pytest.mark.parametrize("device", DEVICES)
def test_kl_backward_twice_and_double_backward(device):
    """backward reuses the forward's gradient buffer once; a second backward (retain_graph) gives
    the same bits, and create_graph gives a correct Hessian-vector product."""
    p, q = randn(5, 33, device=device), randn(5, 33, device=device, seed=1).requires_grad_()
    mask = torch.tensor([1, 1, 0, 1, 1], dtype=torch.bool, device=device)
    loss = ops.kl_div_with_logits(p, q, mask=mask, reduction="sum")
    (g1,) = torch.autograd.grad(loss, q, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, q)
    assert torch.equal(g1, g2)
    v = randn(5, 33, device=device, seed=2)
    q64 = q.detach().double().requires_grad_()
    hv = []
    for fn in (ops.kl_div_with_logits, ref.kl_div_with_logits):
        qq = q64.detach().clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(p.double(), qq, mask=mask, reduction="batchmean"), qq, create_graph=True)
        (h,) = torch.autograd.grad((g * v.double()).sum(), qq)
        hv.append(h)
    torch.testing.assert_close(hv[0], hv[1])
    assert hv[0].abs().max() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_kl_edge_cases(device):
    # identical logits: zero loss and zero gradient
    p = randn(3, 1000, device=device, scale=5.0)
    q = p.clone().requires_grad_()
    rows = ops.kl_div_with_logits(p, q, reduction="none")
    assert (rows.abs() < 1e-5).all()
    (g,) = torch.autograd.grad(rows.sum(), q)
    assert (g.abs() < 1e-6).all()
    # large offsets (online max) and a shift-invariant loss
    p, q = randn(2, 5000, device=device), randn(2, 5000, device=device, seed=1)
    base = ops.kl_div_with_logits(p, q, reduction="none")
    shifted = ops.kl_div_with_logits(p + 1000.0, q - 500.0, reduction="none")
    torch.testing.assert_close(shifted, base, rtol=1e-3, atol=1e-4)
    # a class with p = -inf (probability 0) adds nothing, also where q = -inf: the loss stays finite
    p, q = randn(3, 40, device=device), randn(3, 40, device=device, seed=1).requires_grad_()
    with torch.no_grad():
        p[0, 3] = q[0, 3] = float("-inf")
        p[1, 5] = float("-inf")
    rows = ops.kl_div_with_logits(p, q, reduction="none")
    assert torch.isfinite(rows).all()
    keep = [i for i in range(40) if i != 3]
    torch.testing.assert_close(rows[0], ref.kl_div_with_logits(p[0:1, keep], q[0:1, keep], reduction="sum"))
    torch.testing.assert_close(rows, ref.kl_div_with_logits(p, q, reduction="none"))
    (g,) = torch.autograd.grad(rows.sum(), q)
    assert torch.isfinite(g).all() and g[0, 3] == 0
    # a row with no distribution (p all -inf) is NaN, as in the reference; a masked row is exactly 0
    # with a zero gradient even when its logits are garbage (padding)
    p, q = randn(3, 40, device=device), randn(3, 40, device=device, seed=1).requires_grad_()
    with torch.no_grad():
        p[0] = float("-inf")
        p[2] = float("nan")
    mk = torch.tensor([1, 1, 0], device=device)
    rows = ops.kl_div_with_logits(p, q, mask=mk, reduction="none")
    expected = ref.kl_div_with_logits(p, q, mask=mk, reduction="none")
    assert torch.isnan(rows[0]) and torch.isnan(expected[0])
    assert rows[2] == 0 and expected[2] == 0
    torch.testing.assert_close(rows[1], expected[1])
    (g,) = torch.autograd.grad(rows[1:].sum(), q)
    assert (g[2] == 0).all() and torch.isfinite(g[1]).all()
    # non-contiguous logits
    pt, qt = randn(40, 6, device=device).t(), randn(40, 6, device=device, seed=1).t()
    torch.testing.assert_close(ops.kl_div_with_logits(pt, qt, reduction="none"), ref.kl_div_with_logits(pt, qt, reduction="none"))
    # no rows
    e = torch.empty(0, 9, device=device)
    assert ops.kl_div_with_logits(e, e, reduction="none").shape == (0,)
    assert ops.kl_div_with_logits(e, e, reduction="sum").item() == 0


@pytest.fixture(params=["kernels", "reference"])
def kl_backend(request, monkeypatch):
    """Both paths of ops.kl_div_with_logits: the kernels (where loaded) and the pure-PyTorch reference."""
    if request.param == "kernels" and not COMPILED:
        pytest.skip("compiled kernels not loaded (reference backend)")
    if request.param == "reference":
        monkeypatch.setattr(ops._backend, "HAVE_KERNELS", False)
    return request.param


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
def test_kl_mask_over_fewer_leading_dims_masks_whole_samples(kl_backend, device, reduction):
    """A [B] mask on [B, T, C] logits (and a [B, T] one on [B, T, U, C]) is the mask expanded over
    the remaining leading dims: "mean" counts every row of a kept sample."""
    for shape, mask in [((3, 5, 7), torch.tensor([True, False, True])),
                        ((2, 3, 4, 6), torch.tensor([[1, 0, 1], [0, 0, 1]]))]:
        p = randn(*shape, device=device, scale=2.0)
        q = randn(*shape, device=device, seed=1, scale=2.0).requires_grad_()
        mask = mask.to(device)
        full = mask.reshape(tuple(mask.shape) + (1,) * (len(shape) - 1 - mask.dim())).expand(shape[:-1])
        out = ops.kl_div_with_logits(p, q, mask=mask, reduction=reduction)
        q2 = q.detach().clone().requires_grad_()
        expected = ref.kl_div_with_logits(p, q2, mask=full, reduction=reduction)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        if reduction == "mean":
            rows = ref.kl_div_with_logits(p, q2, mask=full, reduction="none")
            torch.testing.assert_close(out, rows.sum() / int(full.count_nonzero()))
        (g,) = torch.autograd.grad(out.sum(), q)
        (g2,) = torch.autograd.grad(expected.sum(), q2)
        assert_close(g, g2, torch.float32)


@pytest.mark.parametrize("shape", [(3, 0), (0,), (2, 4, 0)])
def test_kl_without_classes_is_an_error(kl_backend, shape):
    p, q = torch.empty(shape), torch.empty(shape)
    with pytest.raises(ValueError, match=r"^q_logits has no classes: shape \(" + ", ".join(map(str, shape))):
        ops.kl_div_with_logits(p, q)


def test_kl_batchmean_of_one_distribution_is_its_sum(kl_backend):
    """1-D logits are one distribution: batchmean is its KL, where F.kl_div divides by the classes."""
    p, q = randn(7, scale=2.0), randn(7, seed=1, scale=2.0)
    out = ops.kl_div_with_logits(p, q)
    torch.testing.assert_close(out, ops.kl_div_with_logits(p, q, reduction="sum"))
    torch.testing.assert_close(out, ops.kl_div_with_logits(p[None], q[None]))
    torch.testing.assert_close(out, 7 * F.kl_div(F.log_softmax(q, -1), F.softmax(p, -1), reduction="batchmean"))


# ---------------------------------------------------------------------------------------------
# embedding_gather_add
# ---------------------------------------------------------------------------------------------
def _gather_inputs(dtype, device, ids_dtype=torch.int64, di_dtype=torch.int64):
    g = torch.Generator().manual_seed(0)
    weight = randn(11, 13, dtype=dtype, device=device)
    delta = randn(4, 13, dtype=dtype, device=device, seed=1, scale=0.1)
    ids = torch.randint(0, 11, (3, 5), generator=g)
    ids[0, 0] = ids[2, 4] = 3  # repeated ids
    ids[1, 1] = 0  # padding row
    delta_index = torch.randint(0, 4, (3, 5), generator=g)
    return weight, ids.to(device, ids_dtype), delta, delta_index.to(device, di_dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("index_dtypes", [(torch.int64, torch.int64), (torch.int32, torch.int64), (torch.int32, torch.int32)],
                         ids=["i64", "i32_i64", "i32"])
def test_embedding_gather_add(device, dtype, index_dtypes):
    weight, ids, delta, di = _gather_inputs(dtype, device, *index_dtypes)
    weight.requires_grad_()
    delta.requires_grad_()
    out = ops.embedding_gather_add(weight, ids, delta, di, padding_idx=0)
    w2, d2 = weight.detach().clone().requires_grad_(), delta.detach().clone().requires_grad_()
    expected = ref.embedding_gather_add(w2, ids.long(), d2, di.long(), padding_idx=0)
    assert out.shape == (3, 5, 13) and out.dtype == dtype
    assert_close(out, expected, dtype)
    go = randn(3, 5, 13, dtype=dtype, device=device, seed=9, scale=2.0)
    gw, gd = torch.autograd.grad(out, (weight, delta), go)
    if uses_kernels(device):
        # F.embedding's backward sums repeated rows in the half dtype; the kernels sum in float32
        # and round once, so compare with sums taken in float64 and rounded once.
        w64, d64 = w2.detach().double().requires_grad_(), d2.detach().double().requires_grad_()
        out64 = ref.embedding_gather_add(w64, ids.long(), d64, di.long(), padding_idx=0)
        gw_ref, gd_ref = (g.to(dtype) for g in torch.autograd.grad(out64, (w64, d64), go.double()))
    else:
        gw_ref, gd_ref = torch.autograd.grad(expected, (w2, d2), go)
    assert_close(gw, gw_ref, dtype)
    assert_close(gd, gd_ref, dtype)
    assert (gw[0] == 0).all()  # padding row
    used = set(ids.flatten().tolist())
    assert all((gw[r] == 0).all() for r in range(11) if r not in used)


@pytest.mark.parametrize("device", DEVICES)
def test_embedding_gather_add_noncontig_and_empty(device):
    weight = randn(13, 11, device=device).t()  # [11, 13], column-major
    delta = randn(13, 4, device=device, seed=1).t()
    ids = torch.tensor([[1, 2, 10], [0, 0, 5]], device=device).t()
    di = torch.tensor([[3, 0, 1], [2, 2, 2]], device=device).t()
    out = ops.embedding_gather_add(weight, ids, delta, di)
    torch.testing.assert_close(out, weight[ids] + delta[di])
    e = torch.empty(0, 7, dtype=torch.long, device=device)
    assert ops.embedding_gather_add(weight, e, delta, e).shape == (0, 7, 13)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding_idx", [None, 2, -9])
def test_embedding_gather_add_gradcheck(device, padding_idx):
    weight, ids, delta, di = _gather_inputs(torch.float64, device)
    weight.requires_grad_()
    delta.requires_grad_()
    if padding_idx is not None:
        # the padding row gets no gradient (as in F.embedding), which gradcheck would flag: keep it out
        pad = padding_idx % 11
        ids = torch.where(ids == pad, (pad + 1) % 11, ids)
    fn = lambda w, d: ops.embedding_gather_add(w, ids, d, di, padding_idx=padding_idx)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (weight, delta))
    if padding_idx is not None:
        ids2 = ids.clone()
        ids2[0, 1] = pad
        (gw,) = torch.autograd.grad(ops.embedding_gather_add(weight, ids2, delta, di, padding_idx=padding_idx).sum(), weight)
        assert (gw[pad] == 0).all() and (gw[ids2[0, 0]] != 0).all()


@pytest.mark.skipif(not COMPILED, reason="compiled kernels not loaded")
def test_embedding_gather_add_kernel_checks_index_range():
    weight, ids, delta, di = _gather_inputs(torch.float32, "cpu")
    bad = ids.clone()
    bad[1, 2] = 11
    with pytest.raises(IndexError, match="ids"):
        torch.ops.fastvat.embedding_gather_add(weight, bad, delta, di, -1)
    bad = di.clone()
    bad[0, 0] = -1
    with pytest.raises(IndexError, match="delta_index"):
        torch.ops.fastvat.embedding_gather_add(weight, ids, delta, bad, -1)
    with pytest.raises(IndexError, match="delta_index"):
        torch.ops.fastvat.embedding_gather_add_backward(randn(3, 5, 13), ids, bad, 11, 4, -1, True, True)


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck (schema, fake kernel, autograd registration, aot dispatch)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_l2_normalize(device):
    require_kernels(device)
    x = randn(3, 4, 5, device=device, dtype=torch.float64).requires_grad_()
    b = randn(3, 4, 5, device=device, dtype=torch.float64, seed=1)
    m = torch.tensor([[1.0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.float64, device=device)
    for args in [(x, b, m, 2.0, "sample"), (x, None, None, 1.0, "global"), (x, b, None, 0.5, "token")]:
        torch.library.opcheck(torch.ops.fastvat.l2_normalize.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_perturb(device):
    require_kernels(device)
    w, d, delta = randn(6, 5, device=device), randn(6, 5, device=device, seed=1), randn(6, 5, device=device, seed=2)
    torch.library.opcheck(torch.ops.fastvat.perturb_.default, (w, d, delta, 1.5, True))
    torch.library.opcheck(torch.ops.fastvat.perturb_.default, (w, d, delta, 1.5, False))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_kl(device):
    require_kernels(device)
    p = randn(4, 9, device=device, dtype=torch.float64)
    q = randn(4, 9, device=device, dtype=torch.float64, seed=1).requires_grad_()
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.fastvat.kl_div_with_logits.default, (p, q, mask, True))
    torch.library.opcheck(torch.ops.fastvat.kl_div_with_logits.default, (p, q.detach(), None, False))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_embedding(device):
    require_kernels(device)
    weight, ids, delta, di = _gather_inputs(torch.float64, device)
    weight.requires_grad_()
    delta.requires_grad_()
    torch.library.opcheck(torch.ops.fastvat.embedding_gather_add.default, (weight, ids, delta, di, 0))
    grad = randn(3, 5, 13, device=device, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.fastvat.embedding_gather_add_backward.default, (grad, ids, di, 11, 4, 0, True, True)
    )
    torch.library.opcheck(
        torch.ops.fastvat.embedding_gather_add_backward.default, (grad, ids, di, 11, 4, -1, False, True)
    )


# ---------------------------------------------------------------------------------------------
# bad input: clear errors naming the argument, raised before anything is written
# ---------------------------------------------------------------------------------------------
def test_bad_inputs_l2_normalize():
    x = randn(2, 3, 4)
    with pytest.raises(TypeError, match="x"):
        ops.l2_normalize(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="norm"):
        ops.l2_normalize(x, norm="row")
    with pytest.raises(ValueError, match="scale"):
        ops.l2_normalize(x, scale=float("nan"))
    with pytest.raises(ValueError, match="scale"):
        ops.l2_normalize(x, scale=float("inf"))
    with pytest.raises(TypeError, match="scale"):
        ops.l2_normalize(x, scale=torch.tensor(1.0))
    with pytest.raises(ValueError, match="mask"):
        ops.l2_normalize(x, mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        ops.l2_normalize(x, mask=torch.ones(2, 3, 4, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="baseline"):
        ops.l2_normalize(x, baseline=randn(2, 3))
    with pytest.raises(ValueError, match="baseline"):
        ops.l2_normalize(x, baseline=torch.empty(2, 3, 4, device="meta"))


@needs_ops
def test_bad_inputs_reach_kernel_checks():
    """Called directly, the kernels name the argument too."""
    x = randn(2, 3)
    with pytest.raises(RuntimeError, match="norm"):
        torch.ops.fastvat.l2_normalize(x, None, None, 1.0, "rows")
    with pytest.raises(RuntimeError, match="mask"):
        torch.ops.fastvat.l2_normalize(x, None, torch.ones(3), 1.0, "global")
    with pytest.raises(RuntimeError, match="baseline"):
        torch.ops.fastvat.l2_normalize(x, randn(3, 2), None, 1.0, "global")
    with pytest.raises(RuntimeError, match="q_logits"):
        torch.ops.fastvat.kl_div_with_logits(randn(2, 3, 4), randn(2, 3, 4), None, False)
    with pytest.raises(RuntimeError, match="mask"):
        torch.ops.fastvat.kl_div_with_logits(x, x, torch.ones(3), False)
    with pytest.raises(RuntimeError, match="delta"):
        torch.ops.fastvat.perturb_(x, x.clone(), torch.zeros(2, 3, dtype=torch.float64), 1.0, False)
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.fastvat.embedding_gather_add(randn(5), torch.zeros(2, dtype=torch.long), randn(1, 5),
                                               torch.zeros(2, dtype=torch.long), -1)


def test_bad_inputs_perturb_leave_weight_untouched():
    w = randn(5, 4)
    w0 = w.clone()
    d = randn(5, 4, seed=1)
    prev = randn(5, 4, seed=2)
    prev0 = prev.clone()
    with pytest.raises(TypeError, match="weight"):
        ops.perturb_(torch.ones(5, 4, dtype=torch.int32), d, scale=1.0)
    with pytest.raises(ValueError, match="direction"):
        ops.perturb_(w, randn(4, 5), scale=1.0)
    with pytest.raises(ValueError, match="direction"):
        ops.perturb_(w, torch.empty(5, 4, device="meta"), scale=1.0)
    with pytest.raises(TypeError, match="previous"):
        ops.perturb_(w, d, scale=1.0, previous=prev.double())
    with pytest.raises(ValueError, match="out"):
        ops.perturb_(w, d, scale=1.0, previous=prev, out=torch.empty(5, 5))
    with pytest.raises(ValueError, match="scale"):
        ops.perturb_(w, d, scale=float("inf"), previous=prev)
    leaf = randn(5, 4).requires_grad_()
    with pytest.raises(ValueError, match="weight"):
        ops.perturb_(leaf, d, scale=1.0)
    with pytest.raises(ValueError, match="weight"):
        ops.restore_(leaf, d)
    assert torch.equal(w, w0) and torch.equal(prev, prev0)


def test_bad_inputs_kl_and_embedding():
    p, q = randn(3, 5), randn(3, 5, seed=1)
    with pytest.raises(ValueError, match="reduction"):
        ops.kl_div_with_logits(p, q, reduction="avg")
    with pytest.raises(ValueError, match="q_logits"):
        ops.kl_div_with_logits(p, randn(3, 6))
    with pytest.raises(TypeError, match="p_logits"):
        ops.kl_div_with_logits(torch.ones(3, 5, dtype=torch.long), q)
    with pytest.raises(ValueError, match="mask"):
        ops.kl_div_with_logits(p, q, mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        ops.kl_div_with_logits(p, q, mask=torch.ones(3, 5, dtype=torch.bool))
    weight, ids, delta, di = _gather_inputs(torch.float32, "cpu")
    with pytest.raises(TypeError, match="weight"):
        ops.embedding_gather_add(weight.long(), ids, delta, di)
    with pytest.raises(TypeError, match="ids"):
        ops.embedding_gather_add(weight, ids.float(), delta, di)
    with pytest.raises(TypeError, match="delta"):
        ops.embedding_gather_add(weight, ids, delta.double(), di)
    with pytest.raises(ValueError, match="delta_index"):
        ops.embedding_gather_add(weight, ids, delta, di[:, :2])
    with pytest.raises(ValueError, match="delta"):
        ops.embedding_gather_add(weight, ids, randn(4, 12), di)
    bad = ids.clone()
    bad[0, 0] = 11
    with pytest.raises((ValueError, IndexError), match="ids"):
        ops.embedding_gather_add(weight, bad, delta, di)
    bad = di.clone()
    bad[0, 0] = 4
    with pytest.raises((ValueError, IndexError), match="delta_index"):
        ops.embedding_gather_add(weight, ids, delta, bad)


# ---------------------------------------------------------------------------------------------
# the ATen fallback used on CPUs without the kernels' ISA (forced with FASTVAT_CPU_SIMD=0)
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not COMPILED, reason="compiled kernels not loaded")
def test_cpu_fallback_path_matches_reference():
    code = textwrap.dedent(
        """
        import torch
        from fastvat import ops, reference as ref
        torch.manual_seed(0)
        for dt in (torch.float32, torch.bfloat16, torch.float64):
            x, b = torch.randn(3, 4, 33).to(dt), torch.randn(3, 4, 33).to(dt)
            m = torch.rand(3, 4) > 0.3
            for norm in ("global", "sample", "token"):
                out = ops.l2_normalize(x, scale=2.0, norm=norm, mask=m, baseline=b)
                exp = ref.l2_normalize(x, scale=2.0, norm=norm, mask=m.to(dt), baseline=b)
                torch.testing.assert_close(out, exp, rtol=2e-2 if dt == torch.bfloat16 else 1e-5, atol=1e-6)
            w, d, prev = torch.randn(9, 7).to(dt), torch.randn(9, 7).to(dt), torch.randn(9, 7).to(dt)
            w2, prev2 = w.clone(), prev.clone()
            ops.perturb_(w, d, scale=1.5, previous=prev)
            ref.perturb_(w2, d, 1.5, previous=prev2)
            torch.testing.assert_close(w, w2, rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(prev, prev2, rtol=2e-2, atol=1e-3)
            p, q = torch.randn(5, 40).to(dt), torch.randn(5, 40).to(dt).requires_grad_()
            mk = torch.tensor([1, 0, 1, 1, 1], dtype=torch.bool)
            l = ops.kl_div_with_logits(p, q, mask=mk, reduction="sum")
            (g,) = torch.autograd.grad(l, q)
            q2 = q.detach().clone().requires_grad_()
            l2 = ref.kl_div_with_logits(p, q2, mask=mk, reduction="sum")
            (g2,) = torch.autograd.grad(l2, q2)
            torch.testing.assert_close(l, l2, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(g, g2, rtol=2e-2, atol=1e-4)
            # no distribution (all -inf) -> NaN; a masked garbage row -> 0, as the SIMD kernel does
            p = torch.randn(3, 40).to(dt)
            p[0], p[2] = float("-inf"), float("nan")
            rows = ops.kl_div_with_logits(p, torch.randn(3, 40).to(dt), mask=torch.tensor([1, 1, 0]), reduction="none")
            assert torch.isnan(rows[0]) and rows[2] == 0 and torch.isfinite(rows[1]), rows
        print("fallback ok")
        """
    )
    env = dict(os.environ, FASTVAT_CPU_SIMD="0", CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "fallback ok" in res.stdout, res.stdout + res.stderr


def test_built_extension_is_the_one_in_use():
    """A built fastvat/_C*.so must load and register the ops (no silent fallback to the reference)."""
    built = glob.glob(os.path.join(os.path.dirname(fastvat.__file__), "_C*.so"))
    if not built:
        pytest.skip("no compiled module in the package folder")
    if os.environ.get("FASTVAT_BACKEND") == "reference":
        pytest.skip("FASTVAT_BACKEND=reference forces the reference")
    info = fastvat.extension_info()
    assert info["backend"] == "compiled", info
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastvat::kl_div_with_logits", "CPU")
