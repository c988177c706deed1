"""ops.kl_div_with_logits against fastvat.reference: every dtype x shape x reduction, masks, -inf and
NaN logits, long rows split into spans, gradients (gradcheck in float64, double backward), and
torch.library.opcheck.

Device is a parameter: the CUDA cases run when a GPU is visible (the same file is the CUDA suite).
"""
import pytest
import torch
import torch.nn.functional as F

from fastvat import ops
from fastvat import reference as ref

from emu_helpers import emulated, kernels  # noqa: F401  (fixtures)
from op_helpers import COMPILED, CPU_KERNELS, CUDA, DEVICES, DTYPE_IDS, DTYPES, assert_close, randn, require_kernels

# (1, 131072) and (3, 200003) take the CPU kernel's column-span split (<= 4 rows of >= 64k classes)
KL_SHAPES = [(5, 7), (64, 1023), (3, 32000), (1, 131072), (3, 200003), (2, 3, 17), (4, 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", KL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kl_matches_reference(kernels, device, dtype, shape):
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
def test_kl_reductions(kernels, device, reduction):
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
def test_kl_backward_twice_and_double_backward(kernels, device):
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
def test_kl_edge_cases(kernels, device):
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
# torch.library.opcheck (schema, fake kernel, autograd registration, aot dispatch)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_kl(device):
    require_kernels(device)
    p = randn(4, 9, device=device, dtype=torch.float64)
    q = randn(4, 9, device=device, dtype=torch.float64, seed=1).requires_grad_()
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.fastvat.kl_div_with_logits.default, (p, q, mask, True))
    torch.library.opcheck(torch.ops.fastvat.kl_div_with_logits.default, (p, q.detach(), None, False))


@pytest.mark.parametrize("backend", [pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="CUDA is not available")),
                                     "emulated-cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(5, 7), (3, 5000), (2, 20001)], ids=lambda s: "x".join(map(str, s)))
def test_kl_kernel_variants_cuda(backend, dtype, shape, emulated):
    """The benchmark-only op's kernel choices agree with the reference; "auto" is kl_div_with_logits
    bit for bit, and an unknown choice is an error. The op exists only in builds with
    FASTVAT_BENCH_OPS=1 (the emulated build always has it)."""
    if backend == "emulated-cuda":
        emulated("kl_div_with_logits", "_kl_div_with_logits_variant")
        device = "cpu"
    else:
        require_kernels("cuda")
        device = "cuda"
    if not hasattr(torch.ops.fastvat, "_kl_div_with_logits_variant"):
        pytest.skip("fastvat was built without the benchmark-only ops (FASTVAT_BENCH_OPS=1)")
    p = randn(*shape, dtype=dtype, device=device, scale=2.0)
    q = randn(*shape, dtype=dtype, device=device, seed=1, scale=2.0)
    mask = torch.ones(shape[0], dtype=torch.float32, device=device)
    mask[-1] = 0.0
    rows_ref = ref.kl_div_with_logits(p, q, mask=mask.bool(), reduction="none")
    grad_ref = (torch.softmax(q.float(), -1) - torch.softmax(p.float(), -1)) * mask[:, None]
    variant_op = torch.ops.fastvat._kl_div_with_logits_variant
    for want_grad in (True, False):
        auto = torch.ops.fastvat.kl_div_with_logits(p, q, mask, want_grad)
        for variant in ("auto", "cached", "stream", "stream512"):
            rows, grad = variant_op(p, q, mask, want_grad, variant)
            if variant == "auto":
                assert torch.equal(rows, auto[0]) and torch.equal(grad, auto[1])
            torch.testing.assert_close(rows.double(), rows_ref.double(), rtol=1e-4, atol=1e-6)
            if want_grad:
                assert_close(grad, grad_ref.to(dtype), dtype, scale=grad_ref.abs().max().item())
            else:
                assert grad.numel() == 0
    with pytest.raises(RuntimeError, match="variant"):
        variant_op(p, q, None, False, "fast")
