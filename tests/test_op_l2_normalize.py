"""ops.l2_normalize against fastvat.reference: every dtype x norm, masks and baselines, awkward shapes,
gradients (gradcheck in float64), torch.library.opcheck, and argument checking.

Device is a parameter: the CUDA cases run when a GPU is visible (the same file is the CUDA suite).
"""
import pytest
import torch

from fastvat import ops
from fastvat import reference as ref

from op_helpers import (CPU_KERNELS, DEVICES, DTYPE_IDS, DTYPES, RTOL, assert_close, randn, require_kernels,
                        uses_kernels)

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
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("with_baseline", [False, True], ids=["x", "x-baseline"])
def test_l2_normalize_masked_out_groups_give_zeros(device, dtype, with_baseline):
    """Padding: masked-out tokens (and samples) are exact zeros whatever x holds there, the largest or
    smallest values of the dtype included, and every other group equals the reference. Unmasked
    groups that are zero, or whose squares underflow, sit next to them: a zero sum of squares alone
    does not make a group zero."""
    fi = torch.finfo(dtype)
    x = randn(3, 9, 40, dtype=dtype, device=device)
    b = randn(3, 9, 40, dtype=dtype, device=device, seed=1) if with_baseline else None
    m = torch.ones(3, 9, dtype=torch.bool, device=device)
    m[0, 5:] = False  # padded tail of sample 0
    m[1, 2] = False
    x[0, 6] = fi.max / 2  # masked out, huge
    x[0, 7] = fi.tiny  # masked out, tiny
    x[1, 2] = -fi.max / 2
    x[2, 3] = 0  # unmasked zero token (a zero x - baseline with a baseline)
    if b is not None:
        b[2, 3] = 0
        b[2, 4] = x[2, 4]  # baseline equal to x: a zero token too
    # unmasked token of tiny values: its float32/float64 squares underflow to a zero sum
    tiny = torch.randn(40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x[2, 5] = (tiny * (1e-200 if dtype == torch.float64 else 1e-30)).to(device=device, dtype=dtype)
    if b is not None:
        b[2, 5] = 0
    out = ops.l2_normalize(x, scale=1.5, norm="token", mask=m, baseline=b)
    expected = ref.l2_normalize(x, scale=1.5, norm="token", mask=m.to(dtype), baseline=b)
    assert torch.equal(out[~m], torch.zeros_like(out[~m]))
    assert_close(out[m], expected[m], dtype)
    if dtype in (torch.float32, torch.float64):  # the tiny token is normalised, not zeroed
        assert abs(out[2, 5].double().norm().item() - 1.5) < 1e-4
    # a fully masked sample holding huge values, on the per-group and the partial-sum schedules
    for shape in [(3, 4, 50), (2, 3, 11001)]:
        x = randn(*shape, dtype=dtype, device=device)
        x[1] = fi.max / 2
        ms = torch.ones(shape[:2], dtype=torch.bool, device=device)
        ms[1] = False
        for norm in ("sample", "token"):
            out = ops.l2_normalize(x, scale=1.5, norm=norm, mask=ms)
            assert torch.equal(out[1], torch.zeros_like(out[1]))
            expected = ref.l2_normalize(x, scale=1.5, norm=norm, mask=ms.to(dtype))
            assert_close(out[0], expected[0], dtype)


@pytest.mark.skipif(not CPU_KERNELS, reason="vectorized CPU kernels not in use")
def test_l2_normalize_cpu_kernel_masked_out_nonfinite_token():
    """The CPU kernel with a mask of one entry per token skips masked-out runs, so a NaN/Inf there
    leaves zeros (docs/reliability.md: the reference and element-wise masks multiply by the mask)."""
    x = randn(2, 4, 33)
    x[0, 1, 3] = float("nan")
    x[1, 2, 0] = float("inf")
    m = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 1]], dtype=torch.bool)
    out = ops.l2_normalize(x, norm="token", mask=m)
    assert torch.equal(out[~m], torch.zeros(2, 33))
    assert_close(out[m], ref.l2_normalize(x, norm="token", mask=m.float())[m], torch.float32)


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


# (x's dtype, baseline's dtype): the output and the arithmetic take the promoted one
MIXED = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.float64),
         (torch.bfloat16, torch.float16), (torch.float32, torch.bfloat16), (torch.float64, torch.float32)]
MIXED_IDS = [f"{DTYPE_IDS[DTYPES.index(a)]}-{DTYPE_IDS[DTYPES.index(b)]}" for a, b in MIXED]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtypes", MIXED, ids=MIXED_IDS)
@pytest.mark.parametrize("norm", ["global", "sample", "token"])
def test_l2_normalize_baseline_of_another_dtype_is_never_rounded_down(device, dtypes, norm):
    """A finite difference x - baseline at 1e-3 against float64 truth: the baseline is not rounded to
    x's dtype first (which leaves a bf16 x's difference mostly rounding noise), and the output has the
    dtype of x - baseline. The gradients come back in each input's own dtype."""
    xd, bd = dtypes
    wide = torch.promote_types(xd, bd)
    x = randn(3, 4, 50, dtype=xd, device=device).requires_grad_()
    b = (x.detach().double() + 1e-3 * randn(3, 4, 50, dtype=torch.float64, device=device, seed=1)).to(bd)
    b.requires_grad_()
    m = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.bool, device=device)
    out = ops.l2_normalize(x, scale=2.0, norm=norm, mask=m, baseline=b)
    assert out.dtype == wide
    x64, b64 = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    expected = ref.l2_normalize(x64, scale=2.0, norm=norm, mask=m.double(), baseline=b64)
    assert_close(out, expected, wide)
    g = randn(3, 4, 50, dtype=torch.float64, device=device, seed=2)
    (out * g.to(wide)).sum().backward()
    (expected * g).sum().backward()
    assert x.grad.dtype == xd and b.grad.dtype == bd
    # each gradient in its own dtype, to that dtype's precision relative to its largest entry
    for got, want, dt in ((x.grad, x64.grad, xd), (b.grad, b64.grad, bd)):
        assert_close(got, want, dt, scale=want.abs().max().item() * 1e2)


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


@pytest.mark.parametrize("norm", ["global", "sample", "token"])
@pytest.mark.parametrize("shape", [(1, 40000), (1, 70000), (1, 1000003), (2, 1, 40000)], ids=str)
def test_l2_normalize_backward_of_one_long_row_independent_of_thread_count(norm, shape):
    """One long group: a plain sum over it is split by ATen into as many parts as there are threads;
    the group sums of the backward are chunked by shape alone, so 1, 2 and 3 threads agree bit for bit."""
    x = randn(*shape).requires_grad_()
    g = randn(*shape, seed=1)
    before = torch.get_num_threads()
    res = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            x.grad = None
            out = ops.l2_normalize(x, norm=norm)
            (out * g).sum().backward()
            res.append((out.detach(), x.grad.clone()))
    finally:
        torch.set_num_threads(before)
    for out, grad in res[1:]:
        assert torch.equal(out, res[0][0]) and torch.equal(grad, res[0][1])


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


# ---------------------------------------------------------------------------------------------
# bad input: clear errors naming the argument
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
