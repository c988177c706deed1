"""fastvat.ops.linear_kl_div against fastvat.reference.linear_kl_div (logits materialised): values and
gradients over dtypes, shapes, masks, reductions and chunk sizes; gradcheck in float64; the chunked
sweep never allocating an [N, V] tensor; no gradient work when none is wanted; torch.compile; bad inputs.

Device is a parameter: the CUDA cases run when a GPU is visible.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastvat import ops
from fastvat import reference as ref
from fastvat.ops import linear_kl

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="CUDA is not available"))]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp64", "bf16"]
REDUCTIONS = ["batchmean", "mean", "sum", "none"]
# Relative tolerance per dtype; bf16 logits are rounded to 8 bits, and the chunked sums of the weight
# gradient round each chunk's product to bf16 where the reference makes one product.
RTOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}
# Absolute tolerance: a fraction of rtol * max|e|, but at least a floor. A KL row and a gradient entry
# are sums of cancelling terms of the logits' size (O(1) here) and carry their rounding, not their own:
# the reference itself is that far from float64 truth. A 1-ulp change of a bf16 logit moves such
# entries by about 1% of the largest.
ATOL_FRACTION = {torch.float32: 0.1, torch.float64: 0.1, torch.bfloat16: 0.5}
ATOL_FLOOR = {torch.float32: 5e-7, torch.float64: 1e-14, torch.bfloat16: 1e-30}


def assert_close(actual, expected, dtype):
    """|a - e| <= rtol * |e| + atol (the loss of a 16-bit input is float32, compared at the input's
    tolerance all the same)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, (a.shape, e.shape)
    rtol = RTOL[dtype]
    big = e.abs().max().item() if e.numel() else 0.0
    torch.testing.assert_close(a, e, rtol=rtol, atol=max(ATOL_FRACTION[dtype] * rtol * big, ATOL_FLOOR[dtype]))



def expand_rows(mask, h):
    """The mask as one 0/1 weight per row of h, written out independently of the op's own expansion."""
    lead = tuple(h.shape[:-1])
    m = mask.to(h.dtype)
    return m.reshape(tuple(m.shape) + (1,) * (len(lead) - m.dim())).expand(lead)

def make(shape, vocab, dtype, device, *, bias=True, seed=0, requires_grad=True):
    """(h_p, h_q, weight, bias): h_q a perturbation of h_p, logits of O(1) spread."""
    g = torch.Generator().manual_seed(seed)
    hidden = shape[-1]
    h_p = torch.randn(*shape, generator=g)
    h_q = h_p + 0.3 * torch.randn(*shape, generator=g)
    w = torch.randn(vocab, hidden, generator=g) / hidden**0.5
    b = torch.randn(vocab, generator=g) * 0.5 if bias else None
    out = [t if t is None else t.to(device=device, dtype=dtype) for t in (h_p, h_q, w, b)]
    if requires_grad:
        for t in out[1:]:
            if t is not None:
                t.requires_grad_(True)
    return out


def grads_of(loss, inputs, seed=1):
    """Gradients of loss (a random upstream gradient for per-row losses) w.r.t. the inputs that are not None."""
    if loss.dim() > 0:
        g = torch.Generator().manual_seed(seed)
        loss = (loss * torch.rand(loss.shape, generator=g).to(loss.device, loss.dtype)).sum()
    live = [t for t in inputs if t is not None]
    return torch.autograd.grad(loss, live)


# (h shape, mask maker, chunk_size): chunk sizes that do not divide N, masks over all or the first dims
CASES = {
    "2d_nomask": ((13, 8), None, 5),
    "2d_mask": ((13, 8), lambda: torch.arange(13) % 3 != 1, 4),
    "3d_token_mask": ((3, 7, 8), lambda: torch.rand(3, 7, generator=torch.Generator().manual_seed(5)) > 0.4, 4),
    "3d_sample_mask": ((3, 7, 8), lambda: torch.tensor([1, 0, 1]), 6),
    "3d_chunk_over_n": ((2, 5, 8), None, 1000),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, bias, reduction, dtype, device):
    shape, mask_fn, chunk = CASES[case]
    h_p, h_q, w, b = make(shape, 37, dtype, device, bias=bias)
    mask = None if mask_fn is None else mask_fn().to(device)
    out = ops.linear_kl_div(h_p, h_q, w, b, mask=mask, reduction=reduction, chunk_size=chunk)
    full_mask = None if mask is None else expand_rows(mask, h_q)
    expected = ref.linear_kl_div(h_p, h_q, w, b, full_mask, reduction)
    assert out.dtype == ref.acc_dtype(dtype)
    assert_close(out, expected, dtype)
    for got, want in zip(grads_of(out, (h_q, w, b)), grads_of(expected, (h_q, w, b))):
        assert got.dtype == dtype
        assert_close(got, want, dtype)


@pytest.mark.parametrize("widen", [True, False], ids=["widened_product", "16bit_product"])
def test_16bit_weight_gradient_strategies(widen, monkeypatch):
    """Both ways of summing a bf16 weight gradient in float32 (float32 copies of each chunk's operands,
    the CPU's; a bf16 product added to the sum, the GPU's) give the reference's gradient."""
    monkeypatch.setattr(linear_kl, "_widen_weight_grad", lambda device: widen)
    h_p, h_q, w, b = make((3, 7, 8), 37, torch.bfloat16, "cpu")
    mask = torch.tensor([1, 0, 1])
    for reduction in ("mean", "none"):
        out = ops.linear_kl_div(h_p, h_q, w, b, mask=mask, reduction=reduction, chunk_size=4)
        expected = ref.linear_kl_div(h_p, h_q, w, b, expand_rows(mask, h_q), reduction)
        for got, want in zip(grads_of(out, (w, b)), grads_of(expected, (w, b))):
            assert got.dtype == torch.bfloat16
            assert_close(got, want, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
def test_same_numbers_as_kl_div_with_logits(device):
    """Built on the fused KL op: per chunk the same rows as kl_div_with_logits on the full logits."""
    h_p, h_q, w, b = make((4, 6, 16), 300, torch.float32, device)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(3)) > 0.3
    out = ops.linear_kl_div(h_p, h_q, w, b, mask=mask.to(device), reduction="none", chunk_size=7)
    full = ops.kl_div_with_logits(F.linear(h_p, w, b), F.linear(h_q, w, b), mask=mask.to(device), reduction="none")
    torch.testing.assert_close(out, full, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_one_token(device):
    """A 1-D h is one token: batchmean is its KL, as for 1-D logits."""
    h_p, h_q, w, b = make((8,), 21, torch.float64, device)
    out = ops.linear_kl_div(h_p, h_q, w, b)
    assert out.shape == ()
    torch.testing.assert_close(out, ref.linear_kl_div(h_p, h_q, w, b))
    assert ops.linear_kl_div(h_p, h_q, w, b, reduction="none").shape == ()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_tokens(reduction, device):
    h_p, h_q, w, b = make((0, 8), 21, torch.float32, device)
    out = ops.linear_kl_div(h_p, h_q, w, b, reduction=reduction)
    assert out.shape == ((0,) if reduction == "none" else ())
    if reduction != "none":
        assert out.item() == 0.0
        gq, gw, gb = torch.autograd.grad(out, (h_q, w, b))
        assert gq.shape == (0, 8) and not gw.any() and not gb.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fully_masked(reduction, device):
    h_p, h_q, w, b = make((3, 4, 8), 21, torch.float32, device)
    mask = torch.zeros(3, 4, dtype=torch.bool, device=device)
    out = ops.linear_kl_div(h_p, h_q, w, b, mask=mask, reduction=reduction, chunk_size=5)
    assert not out.any()
    for g in grads_of(out, (h_q, w, b)):
        assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_masked_rows_with_garbage(garbage, reduction, device):
    """Masked rows count exactly 0 with zero gradient even when their hidden states are NaN or inf;
    the weight and bias gradients stay those of the clean rows."""
    h_p, h_q, w, b = make((3, 5, 8), 21, torch.float32, device)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool, device=device)
    bad_p, bad_q = h_p.detach().clone(), h_q.detach().clone()
    bad_p[~mask] = garbage
    bad_q[~mask] = garbage
    bad_q.requires_grad_(True)
    out = ops.linear_kl_div(bad_p, bad_q, w, b, mask=mask, reduction=reduction, chunk_size=4)
    clean = ops.linear_kl_div(h_p, h_q, w, b, mask=mask, reduction=reduction, chunk_size=4)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, clean)
    if reduction == "none":
        assert (out[~mask] == 0).all()
    gq, gw, gb = grads_of(out, (bad_q, w, b))
    cq, cw, cb = grads_of(clean, (h_q, w, b))
    assert (gq[~mask] == 0).all()
    torch.testing.assert_close(gq, cq)
    torch.testing.assert_close(gw, cw)
    torch.testing.assert_close(gb, cb)
    # the reference follows the same semantics
    expected = ref.linear_kl_div(bad_p, bad_q, w, b, mask, reduction)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_unmasked_nan_propagates(device):
    h_p, h_q, w, b = make((2, 3, 8), 21, torch.float32, device, requires_grad=False)
    h_q = h_q.clone()
    h_q[0, 1, 2] = float("nan")
    rows = ops.linear_kl_div(h_p, h_q, w, b, reduction="none", chunk_size=2)
    assert torch.isnan(rows[0, 1]) and torch.isfinite(rows[1]).all()
    assert torch.isnan(ops.linear_kl_div(h_p, h_q, w, b))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_h_q(reduction, device):
    """gradcheck (and gradgradcheck, the create_graph path) w.r.t. h_q in float64. h_q is the only
    argument whose exact derivative is the op's: p depends on weight and bias too, but is a constant."""
    h_p, h_q, w, b = make((2, 5, 4), 7, torch.float64, device)
    mask = torch.tensor([[1, 0, 1, 1, 1], [1, 1, 0, 0, 1]], dtype=torch.bool, device=device)
    w, b = w.detach(), b.detach()

    def f(hq):
        return ops.linear_kl_div(h_p, hq, w, b, mask=mask, reduction=reduction, chunk_size=3)

    assert torch.autograd.gradcheck(f, (h_q,))
    assert torch.autograd.gradgradcheck(f, (h_q,))


def _central_differences(fn, x, eps=1e-6):
    """d fn / d x by central differences, fn a scalar function of one float64 tensor."""
    grad = torch.zeros_like(x)
    flat, gflat = x.view(-1), grad.view(-1)
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + eps
        hi = fn(x).item()
        flat[i] = old - eps
        lo = fn(x).item()
        flat[i] = old
        gflat[i] = (hi - lo) / (2 * eps)
    return grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "none"])
def test_weight_and_bias_gradients_by_finite_differences(reduction, device):
    """The weight and bias gradients are those of the q side with p's logits held fixed (the clean
    prediction is a constant): checked against central differences of that function in float64."""
    h_p, h_q, w, b = make((2, 5, 4), 7, torch.float64, device)
    mask = torch.tensor([[1, 0, 1, 1, 1], [1, 1, 0, 0, 1]], dtype=torch.bool, device=device)
    h_q = h_q.detach()
    up = torch.rand(2, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(device)

    def scalar(loss):
        return (loss * up).sum() if reduction == "none" else loss

    out = ops.linear_kl_div(h_p, h_q, w, b, mask=mask, reduction=reduction, chunk_size=3)
    gw, gb = torch.autograd.grad(scalar(out), (w, b))
    with torch.no_grad():
        keep = mask.unsqueeze(-1)
        p_logits = F.linear(torch.where(keep, h_p, 0.0), w, b)
        hq0 = torch.where(keep, h_q, 0.0)
        w0, b0 = w.detach().clone(), b.detach().clone()
        num_w = _central_differences(
            lambda wx: scalar(ref.kl_div_with_logits(p_logits, F.linear(hq0, wx, b0), mask, reduction)), w0.clone()
        )
        num_b = _central_differences(
            lambda bx: scalar(ref.kl_div_with_logits(p_logits, F.linear(hq0, w0, bx), mask, reduction)), b0.clone()
        )
    torch.testing.assert_close(gw, num_w, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(gb, num_b, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
def test_h_p_gets_no_gradient(device):
    h_p, h_q, w, b = make((3, 4, 8), 21, torch.float32, device)
    h_p.requires_grad_(True)
    ops.linear_kl_div(h_p, h_q, w, b, chunk_size=5).backward()
    assert h_p.grad is None
    assert h_q.grad is not None and w.grad is not None and b.grad is not None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_second_backward_with_retain_graph(reduction, device):
    """The forward's gradient buffers are consumed by the first backward; a second one recomputes."""
    h_p, h_q, w, b = make((3, 4, 8), 21, torch.float64, device)
    out = ops.linear_kl_div(h_p, h_q, w, b, reduction=reduction, chunk_size=5)
    up = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype, device=device).reshape(out.shape)
    loss = (out * up).sum()
    g1 = torch.autograd.grad(loss, (h_q, w, b), retain_graph=True)
    g2 = torch.autograd.grad(loss, (h_q, w, b))
    expected = torch.autograd.grad((ref.linear_kl_div(h_p, h_q, w, b, None, reduction) * up).sum(), (h_q, w, b))
    for x, y, z in zip(g1, g2, expected):
        torch.testing.assert_close(x, z)
        torch.testing.assert_close(y, z)


class _Recorder(TorchDispatchMode):
    """Records every op and the largest tensor any op creates, looking inside the linear_kl custom ops
    (whose Python implementations run under this mode too)."""

    IMPLS = {
        "fastvat::linear_kl_div": linear_kl._linear_kl_impl,
        "fastvat::linear_kl_div_backward": linear_kl._linear_kl_backward_impl,
    }

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls.append((str(func), args))
        impl = self.IMPLS.get(func._schema.name)
        if impl is not None:
            with self:
                out = impl(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out

    def count(self, name):
        return sum(1 for f, _ in self.calls if f.startswith(name))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_never_allocates_the_logits(dtype, reduction):
    """Forward and backward: no tensor larger than chunk * V (the [N, V] logits would be 16x that)."""
    n, hidden, vocab, chunk = 256, 8, 512, 16
    h_p, h_q, w, b = make((4, n // 4, hidden), vocab, dtype, "cpu")
    mask = torch.ones(4, n // 4, dtype=torch.bool)
    mask[1, 10:] = False
    rec = _Recorder()
    with rec:
        out = ops.linear_kl_div(h_p, h_q, w, b, mask=mask, reduction=reduction, chunk_size=chunk)
        grads_of(out, (h_q, w, b))
    if ops.BACKEND != "reference":  # one fused KL call per chunk (two sweeps for per-row losses)
        assert rec.count("fastvat.kl_div_with_logits") == (2 if reduction == "none" else 1) * n // chunk
    assert rec.largest <= chunk * vocab, rec.largest
    # the recorder does see the logits of the materialising reference
    rec = _Recorder()
    with rec:
        ref.linear_kl_div(h_p, h_q, w, b, None, reduction).sum().backward()
    assert rec.largest >= n * vocab


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_no_gradient_work_under_no_grad(bias):
    n, chunk = 20, 6
    h_p, h_q, w, b = make((n, 8), 21, torch.float32, "cpu", bias=bias)
    rec = _Recorder()
    with torch.no_grad(), rec:
        out = ops.linear_kl_div(h_p, h_q, w, b, chunk_size=chunk)
    assert out.grad_fn is None
    chunks = -(-n // chunk)
    assert rec.count("aten.mm") + rec.count("aten.addmm") == 2 * chunks  # the two logit slabs only
    kl_calls = [a for f, a in rec.calls if f.startswith("fastvat.kl_div_with_logits")]
    if ops.BACKEND != "reference":
        assert len(kl_calls) == chunks and not any(a[3] for a in kl_calls)  # compute_grad=False
    assert rec.largest <= max(chunk * 21, 21 * 8, n * 8)


def test_only_the_wanted_gradients():
    """Only weight requires grad: no h_q gradient is formed (3 matmuls per chunk, not 4), no bias one."""
    n, chunk, vocab, hidden = 20, 6, 21, 8
    h_p, h_q, w, b = make((n, hidden), vocab, torch.float32, "cpu", requires_grad=False)
    w.requires_grad_(True)
    rec = _Recorder()
    with rec:
        out = ops.linear_kl_div(h_p, h_q, w, b, chunk_size=chunk)
        (gw,) = torch.autograd.grad(out, (w,))
    chunks = -(-n // chunk)
    assert rec.count("aten.mm") + rec.count("aten.addmm") == 3 * chunks
    op_out = next(a for f, a in rec.calls if f.startswith("fastvat.linear_kl_div"))
    assert op_out[7:] == (False, True, False)  # need_h_q, need_weight, need_bias
    expected = torch.autograd.grad(ref.linear_kl_div(h_p, h_q, w, b), (w,))[0]
    torch.testing.assert_close(gw, expected)


def test_default_chunk_size():
    assert linear_kl.default_chunk_size(128256) == 64
    assert linear_kl.default_chunk_size(32000) == 256
    assert linear_kl.default_chunk_size(1) == 1 << 23
    assert linear_kl.default_chunk_size(1 << 24) == 1
    for v in (7, 30522, 50257, 128256, 256000):
        c = linear_kl.default_chunk_size(v)
        assert c * v <= 1 << 23 and 2 * c * v > 1 << 23 and c & (c - 1) == 0


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_matches_eager(backend, reduction):
    """torch.compile of a function calling the op: one graph (fullgraph=True), eager's loss and gradients."""
    torch._dynamo.reset()
    h_p, h_q, w, b = make((2, 5, 8), 37, torch.float32, "cpu")
    mask = torch.tensor([True, False])

    def fn(h_p, h_q, w, b, mask):
        out = ops.linear_kl_div(h_p, h_q, w, b, mask=mask, reduction=reduction, chunk_size=3)
        return (out.square().sum() if reduction == "none" else out) * 2

    try:
        compiled = torch.compile(fn, fullgraph=True, backend=backend)
        got = compiled(h_p, h_q, w, b, mask)
        got_grads = torch.autograd.grad(got, (h_q, w, b))
    finally:
        torch._dynamo.reset()
    want = fn(h_p, h_q, w, b, mask)
    want_grads = torch.autograd.grad(want, (h_q, w, b))
    torch.testing.assert_close(got, want)
    for x, y in zip(got_grads, want_grads):
        torch.testing.assert_close(x, y)


def test_opcheck():
    """Schema, fake kernel and autograd registration of the custom op (torch.library.opcheck)."""
    h_p, h_q, w, b = make((9, 4), 11, torch.float64, "cpu")
    mask = (torch.arange(9) % 4 != 0).double()
    for reduce in (True, False):
        args = (h_p, h_q, w, b, mask, 4, reduce, True, True, True)
        torch.library.opcheck(torch.ops.fastvat.linear_kl_div.default, args)
    grad_rows = torch.rand(9, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.fastvat.linear_kl_div_backward.default,
        (h_p.detach(), h_q.detach(), w.detach(), b.detach(), mask, grad_rows, 4, True, True, True),
    )


def _bad(**change):
    h_p, h_q, w, b = make((2, 3, 8), 21, torch.float32, "cpu")
    kwargs = dict(h_p=h_p, h_q=h_q, weight=w, bias=b)
    kwargs.update(change)
    return kwargs


BAD = {
    "h_p_not_tensor": (dict(h_p=[1.0]), TypeError, "h_p"),
    "h_q_int": (dict(h_q=torch.zeros(2, 3, 8, dtype=torch.int64)), TypeError, "h_q"),
    "weight_int": (dict(weight=torch.zeros(21, 8, dtype=torch.int32)), TypeError, "weight"),
    "bias_not_tensor": (dict(bias=1.0), TypeError, "bias"),
    "h_p_shape": (dict(h_p=torch.zeros(2, 4, 8)), ValueError, "h_p"),
    "h_q_0dim": (dict(h_p=torch.tensor(1.0), h_q=torch.tensor(1.0)), ValueError, "h_q"),
    "weight_1d": (dict(weight=torch.zeros(21)), ValueError, "weight"),
    "weight_hidden": (dict(weight=torch.zeros(21, 7)), ValueError, "weight"),
    "weight_no_rows": (dict(weight=torch.zeros(0, 8), bias=None), ValueError, "weight"),
    "bias_shape": (dict(bias=torch.zeros(20)), ValueError, "bias"),
    "h_p_dtype": (dict(h_p=torch.zeros(2, 3, 8, dtype=torch.float64)), TypeError, "h_p"),
    "weight_dtype": (dict(weight=torch.zeros(21, 8, dtype=torch.bfloat16)), TypeError, "weight"),
    "bias_dtype": (dict(bias=torch.zeros(21, dtype=torch.float64)), TypeError, "bias"),
    "mask_not_tensor": (dict(mask=[1, 0]), TypeError, "mask"),
    "mask_too_many_dims": (dict(mask=torch.ones(2, 3, 8)), ValueError, "mask"),
    "mask_shape": (dict(mask=torch.ones(3)), ValueError, "mask"),
    "mask_dtype": (dict(mask=torch.ones(2, dtype=torch.complex64)), TypeError, "mask"),
    "reduction": (dict(reduction="avg"), ValueError, "reduction"),
    "chunk_zero": (dict(chunk_size=0), ValueError, "chunk_size"),
    "chunk_float": (dict(chunk_size=2.0), TypeError, "chunk_size"),
    "chunk_bool": (dict(chunk_size=True), TypeError, "chunk_size"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs(case):
    change, exc, name = BAD[case]
    kwargs = _bad(**change)
    with pytest.raises(exc, match=name):
        ops.linear_kl_div(kwargs.pop("h_p"), kwargs.pop("h_q"), kwargs.pop("weight"), kwargs.pop("bias"), **kwargs)


@pytest.mark.skipif(not CUDA, reason="CUDA is not available")
@pytest.mark.parametrize("name", ["h_p", "weight", "bias", "mask"])
def test_device_mismatch(name):
    kwargs = _bad()
    kwargs["mask"] = torch.ones(2, 3, dtype=torch.bool)
    for key in ("h_q",) + tuple(k for k in ("h_p", "weight", "bias", "mask") if k != name):
        kwargs[key] = kwargs[key].detach().cuda()
    with pytest.raises(ValueError, match=name):
        ops.linear_kl_div(kwargs.pop("h_p"), kwargs.pop("h_q"), kwargs.pop("weight"), kwargs.pop("bias"), **kwargs)
