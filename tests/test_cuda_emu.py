"""The CUDA kernels (csrc/cuda/), executed on the CPU by the emulator (tests/cuda_emu/), against
float64 truth from fastvat.reference.

The cases are chosen by the host launchers' dispatch: each kernel and each template configuration
(warp and block teams, cached and streamed rows, vector and scalar paths, one-pass and chunked
norms), with rows shorter than the team (idle lanes and warps), tails, misaligned starts, masks
of every kind, every dtype, and extreme magnitudes. Every call runs under several fiber resume
orders and must agree bit for bit (emu_helpers.OrderChecked). Errors are in units of the last
place: the emulator's exp/log are glibc's and its multiply-adds are not fused, so bits may differ
from a GPU's by a few ulps.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fastvat import reference as ref

from emu_helpers import checked, emulated, has_op, load, ulp_error  # noqa: F401  (emulated: a fixture)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp64", "fp16", "bf16"]


def vec(dtype):
    return 16 // torch.empty((), dtype=dtype).element_size()


def seeded(*shape, seed=0, scale=1.0, dtype=torch.float32, offset=0):
    """Normal values of dtype; offset > 0 starts the tensor `offset` elements past a 16-byte boundary."""
    g = torch.Generator().manual_seed(seed)
    v = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    if not offset:
        return v
    buf = torch.zeros(v.numel() + offset, dtype=dtype)
    buf[offset:] = v.flatten()
    return buf[offset:].view(v.shape)


@pytest.fixture(scope="module")
def emu():
    return load()


# ---- l2_normalize -----------------------------------------------------------------------------------
def l2_truth(x, norm, mask=None, baseline=None, scale=1.0):
    b = None if baseline is None else baseline.double()
    m = None if mask is None else mask.double()
    return ref.l2_normalize(x.double(), scale=scale, norm=norm, mask=m, baseline=b)


def l2_case(emu, x, norm, mask=None, baseline=None, scale=0.75, tol=2.0):
    out = checked("l2_normalize")(x, baseline, mask, scale, norm)
    assert out.dtype == x.dtype and out.shape == x.shape
    truth = l2_truth(x, norm, mask, baseline, scale)
    # elements near 0 carry the factor's error at the group's scale: floor at 1e-3 of the largest
    floor = truth.abs().max().item() * 1e-3 if truth.numel() else 0.0
    err = ulp_error(out, truth, x.dtype, floor=floor)
    if x.dtype == torch.float64:
        tol += 2  # the truth itself is float64 (a sqrt, a division and a product: ~2 ulp)
    assert err <= tol, f"{err:.2f} ulp"


# (shape, norm): the kernel each takes for fp32 (nvec = group length / 4), 4 emulated SMs
L2_SHAPES = [
    ((13, 37), "token"),        # warp team, 4 vectors per lane: 8 rows per block, 3 idle warps in block 2
    ((9, 800), "token"),        # warp team, 8 vectors per lane
    ((3, 5000), "token"),       # 512-thread block team, 4 vectors per thread
    ((2, 12000), "token"),      # 512-thread block team, 8 vectors per thread
    ((5, 3, 70), "sample"),     # group of 210: warp team with a tail
    ((300001,), "global"),      # one big group: two chunked kernels
    ((8, 20003), "token"),      # > 4096 vectors per group, rows >= SMs: chunked kernels with a tail
    ((1,), "global"),           # one element
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,norm", L2_SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
def test_l2_normalize(emu, dtype, shape, norm):
    l2_case(emu, seeded(*shape, seed=1, dtype=dtype), norm)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("norm", ["global", "sample", "token"])
def test_l2_normalize_misaligned_with_baseline(emu, dtype, norm):
    """A start 1 element past a 16-byte boundary takes the scalar chunked kernels."""
    x = seeded(6, 7, 45, seed=2, dtype=dtype, offset=1)
    b = seeded(6, 7, 45, seed=3, dtype=dtype, scale=0.1)
    l2_case(emu, x, norm, baseline=b, tol=3.0)  # x - baseline is rounded once more


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,mask_shape,norm", [
    ((6, 8, 37), (6, 8), "token"),     # mask constant per group: whole groups skipped (row mask)
    ((6, 8, 37), (6,), "sample"),      # the same, one group per sample
    ((6, 8, 37), (6, 8), "sample"),    # 37 elements per mask entry: per-element mask
    ((6, 8, 40), (6, 8), "sample"),    # 40 per entry: per-vector mask
    ((6, 8, 40), (6, 8), "global"),    # chunked kernels with a mask
], ids=["row-token", "row-sample", "per-element", "per-vector", "global"])
def test_l2_normalize_masked(emu, dtype, shape, mask_shape, norm):
    x = seeded(*shape, seed=4, dtype=dtype)
    mask = (seeded(*mask_shape, seed=5) > -0.5).to(dtype)
    mask[0] = 0  # a fully masked group
    l2_case(emu, x, norm, mask=mask)


@pytest.mark.parametrize("dtype,magnitude", [
    (torch.float32, 1e-30), (torch.float32, 1e30), (torch.float32, 1e-42), (torch.float64, 1e-300),
    (torch.float64, 1e300), (torch.float64, 1e-160), (torch.float64, 1e-148), (torch.float64, 1e152), (torch.float16, 1e-6), (torch.float16, 1e4),
    (torch.bfloat16, 1e-35), (torch.bfloat16, 1e35),
], ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("shape,norm", [((5, 37), "token"), ((3, 5000), "token"), ((70001,), "global"),
                                        ((4, 9, 31), "sample")], ids=["warp", "block", "chunks", "sample"])
def test_l2_normalize_extreme_magnitudes(emu, dtype, magnitude, shape, norm):
    """Sums of squares that under- or overflow take the robust (scaled) path."""
    l2_case(emu, seeded(*shape, seed=6, dtype=dtype, scale=magnitude), norm, tol=3.0)


@pytest.mark.parametrize("scale", [1e30, 1e-30])
@pytest.mark.parametrize("shape,norm", [((5, 37), "token"), ((3, 5000), "token"), ((70001,), "global")],
                         ids=["warp", "block", "chunks"])
def test_l2_normalize_extreme_scale(emu, scale, shape, norm):
    """A trusted sum of squares whose factor scale / ||v|| is no normal float: the wide factor."""
    l2_case(emu, seeded(*shape, seed=8, scale=1e-10 if scale > 1 else 1e10), norm, scale=scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape,norm", [((4, 37), "token"), ((4, 5000), "token"), ((4, 70001), "token")],
                         ids=["warp", "block", "chunks"])
def test_l2_normalize_zero_and_nonfinite_groups(emu, dtype, shape, norm):
    x = seeded(*shape, seed=7, dtype=dtype, scale=1e200 if dtype == torch.float64 else 1.0)
    x[1] = 0
    x[2, 3] = float("nan")
    x[3, 5] = float("inf")
    out = checked("l2_normalize")(x, None, None, 1.0, norm)
    truth = l2_truth(x, norm)
    assert ulp_error(out[[0]], truth[[0]], x.dtype, floor=1e-3 * truth[0].abs().max().item()) <= 2
    torch.testing.assert_close(out[1:], truth[1:].to(dtype), equal_nan=True, rtol=0, atol=0)


# ---- perturb_ -----------------------------------------------------------------------------------------
def perturb_case(n, wdtype, ddtype, has_prev, offset=0, dmag=1.0, scale=0.75):
    d = seeded(n, seed=11, dtype=ddtype, scale=dmag, offset=offset)
    w = seeded(n, seed=12, dtype=wdtype, offset=offset)
    delta = seeded(n, seed=13, dtype=wdtype, scale=1e-2, offset=offset)
    w0, prev0 = w.clone(), delta.clone()
    checked("perturb_")(w, d, delta, scale, has_prev)
    # truth: the reference's roundings (direction's dtype, then weight's) from a float64 norm
    new = ref.l2_normalize(d.double(), scale=scale, norm="global").to(ddtype).to(wdtype)
    assert ulp_error(delta, new.double(), wdtype) <= 2
    want = w0.double() + (new.double() - prev0.double() if has_prev else new.double())
    size = w0.double().abs() + new.double().abs() + (prev0.double().abs() if has_prev else 0)
    err = ((w.double() - want).abs() / (size * torch.finfo(wdtype).eps)).max().item()
    assert err <= 2, err
    # from the stored perturbation, the weight is rounded once: W(acc(w) + (acc(new) - acc(previous)))
    acc = ref.acc_dtype(wdtype)
    step = delta.to(acc) - prev0.to(acc) if has_prev else delta.to(acc)
    assert torch.equal(w, (w0.to(acc) + step).to(wdtype))


@pytest.mark.parametrize("wdtype,ddtype", [
    (torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.float16),
    (torch.float64, torch.bfloat16),
], ids=lambda t: str(t).replace("torch.float", "f").replace("torch.", ""))
@pytest.mark.parametrize("has_prev", [True, False], ids=["prev", "noprev"])
def test_perturb(emu, wdtype, ddtype, has_prev):
    perturb_case(30001, wdtype, ddtype, has_prev)


@pytest.mark.parametrize("n,offset", [(1, 0), (7, 0), (100003, 0), (7001, 1), (5000, 3)],
                         ids=["n1", "n7", "n100003", "n7001-misaligned", "n5000-misaligned"])
def test_perturb_sizes_and_alignment(emu, n, offset):
    perturb_case(n, torch.float32, torch.float32, True, offset=offset)


@pytest.mark.parametrize("dtype,dmag", [(torch.float32, 1e-25), (torch.float32, 1e25), (torch.float32, 1e-40),
                                        (torch.float32, 1e-44), (torch.float32, 1e36), (torch.float64, 1e200),
                                        (torch.float64, 1e-200), (torch.float64, 1e-310), (torch.bfloat16, 1e35)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_perturb_extreme_directions(emu, dtype, dmag):
    perturb_case(20000, dtype, dtype, True, dmag=dmag)


def test_perturb_zero_direction_leaves_weight(emu):
    w, d, delta = seeded(1000, seed=1), torch.zeros(1000), seeded(1000, seed=2)
    w0, prev = w.clone(), delta.clone()
    checked("perturb_")(w, d, delta, 1.0, True)
    wref, dref = w0.clone(), prev.clone()
    ref.perturb_(wref, d, 1.0, previous=dref)
    assert torch.equal(w, wref) and torch.equal(delta, dref)


# ---- kl_div_with_logits -------------------------------------------------------------------------------
def kl_inputs(N, C, dtype, fill="normal", seed=21, offset=0):
    p = seeded(N, C, seed=seed, dtype=torch.float64, scale=2.0)
    if fill == "close":
        q = p + seeded(N, C, seed=seed + 1, dtype=torch.float64, scale=1e-2)
    else:
        q = seeded(N, C, seed=seed + 1, dtype=torch.float64, scale=2.0)
    if fill == "shifted":
        p, q = p + 60.0, q - 45.0
    if fill == "neginf":
        p[0, 3] = -math.inf
        q[min(1, N - 1), 5] = -math.inf
    if fill == "huge":
        p[:, 0] = 1e4
    return (seeded(N, C, dtype=dtype, offset=offset).copy_(p.to(dtype)),
            seeded(N, C, dtype=dtype, offset=offset).copy_(q.to(dtype)))


def kl_truth(p, q, mask=None):
    lp, lq = F.log_softmax(p.double(), -1), F.log_softmax(q.double(), -1)
    sp = lp.exp()
    rows = ref.kl_rows(p.double(), q.double(), None if mask is None else mask.double())
    grad = lq.exp() - sp
    if mask is not None:
        grad = grad * mask.double().unsqueeze(-1)
    # the loss's error scale: sum softmax(p) (|lp| + |lq|) over the row (0 log 0 = 0)
    scale = torch.where(sp == 0, torch.zeros_like(sp), sp * (lp.abs() + lq.abs())).sum(-1)
    return rows, grad, scale, torch.maximum(sp, lq.exp()).amax(-1)


def kl_check(rows, grad, p, q, mask, want_grad, tol_loss=4.0, tol_grad=4.0):
    truth, gtruth, lscale, pmax = kl_truth(p, q, mask)
    acc = ref.acc_dtype(q.dtype)
    assert rows.dtype == acc and rows.shape == q.shape[:1]
    eps_a, eps_t = torch.finfo(acc).eps, torch.finfo(q.dtype).eps
    r, t = rows.double(), truth
    bad = r.isnan() != t.isnan()
    assert not bad.any(), (r, t)
    if acc == torch.float64:
        # the float64 truth carries rounding errors as large as the kernel's: its exps and logs, its
        # sums over the row, the difference of two probabilities in the gradient
        tol_loss += 0.1 * math.sqrt(q.shape[-1])
        tol_grad += 8
    fin = ~t.isnan() & (r != t)
    lerr = ((r - t).abs()[fin] / (torch.maximum(t.abs(), lscale)[fin].clamp_min(1e-300) * eps_a))
    assert lerr.max().item() <= tol_loss if lerr.numel() else True, lerr.max().item()
    if not want_grad:
        assert grad.numel() == 0
        return
    assert grad.dtype == q.dtype and grad.shape == q.shape
    g, gt = grad.double(), gtruth
    assert torch.equal(g.isnan(), gt.isnan())
    gerr = ((g - gt).abs() / (pmax.clamp_min(1e-300).unsqueeze(-1) * eps_t))[~gt.isnan() & (g != gt)]
    assert gerr.max().item() <= tol_grad if gerr.numel() else True, gerr.max().item()


def kl_mask(N, dtype):
    m = (seeded(N, seed=99) > -0.6).to(ref.acc_dtype(dtype))
    m[0] = 0
    return m


# (N, C) and the kernel each takes for fp32 (nvec = C / 4): cached warp team (<= 128 vectors), cached
# 256-thread block (<= 2048), streamed 1024-thread block; C not a multiple of 4 gives head/tail scalars
KL_SHAPES = [(13, 37), (9, 20), (10, 512), (3, 5000), (2, 8195), (2, 20011)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", KL_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("want_grad", [True, False], ids=["grad", "loss"])
def test_kl(emu, dtype, shape, want_grad):
    p, q = kl_inputs(*shape, dtype)
    rows, grad = checked("kl_div_with_logits")(p, q, None, want_grad)
    kl_check(rows, grad, p, q, None, want_grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(13, 37), (3, 5000), (3, 20011)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("fill", ["close", "shifted", "neginf", "huge", "masked"])
def test_kl_hard_rows(emu, dtype, shape, fill):
    mask = kl_mask(shape[0], dtype) if fill == "masked" else None
    p, q = kl_inputs(*shape, dtype, fill="normal" if fill == "masked" else fill)
    rows, grad = checked("kl_div_with_logits")(p, q, mask, True)
    kl_check(rows, grad, p, q, mask, True)
    rows1, _ = checked("kl_div_with_logits")(p, q, mask, False)  # pass-1 loss of the streamed kernel
    kl_check(rows1, torch.empty(0), p, q, mask, False)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(13, 301), (9, 20), (2, 3001)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_kl_misaligned(emu, dtype, shape):
    """Logits starting past a 16-byte boundary take the scalar streaming kernels (warp team for
    C <= 1024, 1024-thread block above)."""
    p, q = kl_inputs(*shape, dtype, offset=1)
    mask = kl_mask(shape[0], dtype)
    for want_grad in (True, False):
        rows, grad = checked("kl_div_with_logits")(p, q, mask, want_grad)
        kl_check(rows, grad, p, q, mask, want_grad)


def test_kl_all_neginf_row_is_nan(emu):
    p, q = kl_inputs(3, 40, torch.float32)
    p[1] = -math.inf
    q[2] = -math.inf
    for want_grad in (True, False):
        rows, grad = checked("kl_div_with_logits")(p, q, None, want_grad)
        assert rows[1:].isnan().all() and not rows[0].isnan()
        if want_grad:
            assert grad[1:].isnan().all() and not grad[0].isnan().any()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(5, 37), (3, 5000), (2, 12000), (2, 20011)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", ["auto", "cached", "stream", "stream512"])
def test_kl_variants(emu, dtype, shape, variant):
    """Every kernel choice of the benchmark-only op (the 512-thread cached kernel for fp32 rows of
    2049..4096 vectors, the 512- and 1024-thread streaming kernels for any row)."""
    if not has_op("_kl_div_with_logits_variant"):
        pytest.skip("built without FASTVAT_BENCH_OPS")
    p, q = kl_inputs(*shape, dtype, fill="close")
    mask = kl_mask(shape[0], dtype)
    for want_grad in (True, False):
        rows, grad = checked("_kl_div_with_logits_variant")(p, q, mask, want_grad, variant)
        kl_check(rows, grad, p, q, mask, want_grad)


def test_kl_variant_name_is_checked(emu):
    if not has_op("_kl_div_with_logits_variant"):
        pytest.skip("built without FASTVAT_BENCH_OPS")
    p, q = kl_inputs(2, 8, torch.float32)
    with pytest.raises(RuntimeError, match="variant"):
        emu._kl_div_with_logits_variant(p, q, None, False, "fast")


# ---- embedding_gather_add -----------------------------------------------------------------------------
def gather_inputs(V, H, N, dtype, D=None, ids_dtype=torch.int64, offset=0, seed=31):
    g = torch.Generator().manual_seed(seed)
    D = D or V
    w = seeded(V, H, seed=seed, dtype=dtype, offset=offset)
    d = seeded(D, H, seed=seed + 1, dtype=dtype, scale=0.1, offset=offset)
    ids = torch.randint(0, V, (N,), generator=g).to(ids_dtype)
    ids[: min(N, 5)] = ids[0]  # repeated ids: a segment over several tokens
    di = torch.randint(0, D, (N,), generator=g).to(ids_dtype)
    return w, ids, d, di


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("V,H,N,offset", [(11, 13, 15, 0), (50, 64, 300, 0), (50, 2048, 40, 0), (30, 64, 70, 1),
                                          (7, 1, 9, 0)],
                         ids=["H13", "H64", "H2048", "H64-misaligned", "H1"])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
def test_embedding_gather_add(emu, dtype, V, H, N, offset, ids_dtype):
    w, ids, d, di = gather_inputs(V, H, N, dtype, ids_dtype=ids_dtype, offset=offset)
    out = checked("embedding_gather_add")(w, ids, d, di, -1)
    want = ref.embedding_gather_add(w, ids.long(), d, di.long())
    assert out.dtype == dtype and torch.equal(out, want.to(dtype))  # one rounding of an exact sum


def test_embedding_gather_add_mixed_index_dtypes(emu):
    w, ids, d, di = gather_inputs(11, 16, 20, torch.float32)
    out = checked("embedding_gather_add")(w, ids.int(), d, di, -1)
    assert torch.equal(out, ref.embedding_gather_add(w, ids, d, di))


def test_embedding_gather_add_out_of_range_id_is_a_device_assert(emu):
    w, ids, d, di = gather_inputs(11, 16, 20, torch.float32)
    ids[7] = 11
    with pytest.raises(RuntimeError, match="device-side assert"):
        emu.embedding_gather_add(w, ids, d, di, -1)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("V,D,H,N,offset", [(11, 4, 13, 15, 0), (40, 7, 64, 300, 0), (5, 3, 96, 200, 0),
                                            (20, 6, 64, 70, 1), (3, 2, 300, 100, 0)],
                         ids=["H13", "H64-many-chunks", "long-segments", "misaligned", "H300"])
@pytest.mark.parametrize("padding_idx", [-1, 0])
def test_embedding_gather_add_backward(emu, dtype, V, D, H, N, offset, padding_idx):
    """Segment sums over sorted ids: kernel 1 per 32-token chunk, kernel 2 joins segments that
    cross chunks (long-segments: a few ids over 200 tokens)."""
    _, ids, _, di = gather_inputs(V, H, N, dtype, D=D)
    grad = seeded(N, H, seed=41, dtype=dtype, offset=offset)
    gw, gd = checked("embedding_gather_add_backward")(grad, ids, di, V, D, padding_idx, True, True)
    tw = torch.zeros(V, H, dtype=torch.float64).index_add_(0, ids, grad.double())
    if padding_idx >= 0:
        tw[padding_idx] = 0
    td = torch.zeros(D, H, dtype=torch.float64).index_add_(0, di, grad.double())
    # each sum is rounded once, from opmath: bounded by ~count ulps of the sum of magnitudes
    acc = ref.acc_dtype(dtype)
    for got, truth, keys, rows in ((gw, tw, ids, V), (gd, td, di, D)):
        assert got.dtype == dtype and got.shape == (rows, H)
        mag = torch.zeros(rows, H, dtype=torch.float64).index_add_(0, keys, grad.double().abs())
        if got is gw and padding_idx >= 0:
            mag[padding_idx] = 0
        bound = mag * (N * torch.finfo(acc).eps) + truth.abs() * torch.finfo(dtype).eps
        assert ((got.double() - truth).abs() <= bound).all()
    gw2, gd2 = checked("embedding_gather_add_backward")(grad, ids, di, V, D, padding_idx, False, True)
    assert gw2.numel() == 0 and torch.equal(gd2, gd)


# ---- linear_kl_div's per-chunk KL -------------------------------------------------------------------
# (16-bit slabs are matmuls in the 16-bit dtype, far from a float64 truth; the KL kernel's 16-bit paths
# are checked above on logits directly)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_linear_kl_chunks_on_the_cuda_kl_kernel(emulated, dtype, reduction):
    """linear_kl_div's chunks ([chunk, V] logit slabs, some rows masked) through the emulated CUDA KL
    kernel: loss and the gradients for h_q, weight and bias against the materialised reference."""
    emulated("kl_div_with_logits")
    from fastvat import ops

    h_p = seeded(3, 5, 24, seed=51, dtype=dtype)
    h_q = (h_p.double() + seeded(3, 5, 24, seed=52, dtype=torch.float64, scale=0.1)).to(dtype)
    w = seeded(1003, 24, seed=53, dtype=dtype, scale=0.3)
    b = seeded(1003, seed=54, dtype=dtype, scale=0.1)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 2:] = False
    args = [t.clone().requires_grad_() for t in (h_q, w, b)]
    out = ops.linear_kl_div(h_p, args[0], args[1], args[2], mask=mask, reduction=reduction, chunk_size=4)
    ref_args = [t.double().clone().requires_grad_() for t in (h_q, w, b)]
    want = ref.linear_kl_div(h_p.double(), ref_args[0], ref_args[1], ref_args[2], mask=mask, reduction=reduction)
    go = seeded(*want.shape, seed=55, dtype=torch.float64) if want.dim() else torch.tensor(1.0, dtype=torch.float64)
    grads = torch.autograd.grad(out, args, go.to(out.dtype))
    want_grads = torch.autograd.grad(want, ref_args, go)
    tol = {torch.float32: 1e-4, torch.float64: 1e-10}[dtype]
    scale = want.abs().max().item()
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol * scale)
    for g, wg in zip(grads, want_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), wg, rtol=tol, atol=tol * wg.abs().max().item())


# ---- the KL of nearby distributions, relative to its own size --------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", [(5, 37), (3, 5000), (2, 20011)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", ["auto", "cached", "stream", "stream512"])
def test_kl_tiny_is_accurate_relative_to_itself(emu, dtype, shape, variant):
    """q = p + 1e-5 noise on shifted logits: the KL (~1e-11) within 1e-3 of its second-order value
    ½ Var_π(p − q) of the given logits (exact to O(|p − q|³), independent of the kernel's algebra),
    never negative; where p == q (row 0) the KL and the gradient are exactly 0."""
    if variant != "auto" and not has_op("_kl_div_with_logits_variant"):
        pytest.skip("built without FASTVAT_BENCH_OPS")
    p64 = seeded(*shape, seed=5, dtype=torch.float64, scale=2.0) + 7.0
    q64 = p64 + seeded(*shape, seed=6, dtype=torch.float64, scale=1e-5)
    p, q = p64.to(dtype), q64.to(dtype)
    q[0] = p[0]
    if variant == "auto":
        rows, grad = checked("kl_div_with_logits")(p, q, None, True)
    else:
        rows, grad = checked("_kl_div_with_logits_variant")(p, q, None, True, variant)
    d = p.double() - q.double()
    pi = torch.softmax(p.double(), -1)
    m = (pi * d).sum(-1, keepdim=True)
    second_order = 0.5 * (pi * (d - m) ** 2).sum(-1)
    assert (rows >= 0).all(), rows
    assert rows[0] == 0 and (grad[0] == 0).all()
    rel = ((rows.double() - second_order).abs() / second_order)[1:]
    assert rel.max().item() <= 1e-3, rel
