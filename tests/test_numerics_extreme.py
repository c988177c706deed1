"""The ops against float64 truth on shifted, tiny, huge and degenerate inputs, on every CPU path.

Softmax is shift-invariant, so KL(softmax(p + a) || softmax(q + b)) must not lose digits as the
offsets grow; an L2 normalisation must give a unit direction for any finite non-zero vector, not
zeros when the sum of squares under- or overflows. Each case runs on the vectorized kernels, on their
ATen fallback (FASTVAT_CPU_SIMD=0, in a subprocess) and on the pure-PyTorch reference; the cases taking
the ``kernels`` fixture also run on the CUDA kernels, emulated on the CPU (tests/emu_helpers.py).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from fastvat import ops
from fastvat import reference as ref

from emu_helpers import emulated, kernels  # noqa: F401  (fixtures)
from op_helpers import needs_ops


def kl_truth(p, q):
    """Per-row KL in float64 from the very values the op sees."""
    lp, lq = F.log_softmax(p.double(), -1), F.log_softmax(q.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def offset_rows(n, c, offset, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    p0 = torch.randn(n, c, generator=g)
    q0 = p0 + 0.5 * torch.randn(n, c, generator=g)
    return (p0 + offset).to(dtype), (q0 - offset).to(dtype)


def max_rel_err(rows, truth):
    return ((rows.double() - truth) / truth.abs()).abs().max().item()


# Shapes that take each CPU path: many short rows (row-parallel), rows of common LLM vocabulary
# sizes (32k, 128k), and at most 4 rows of >= 64k classes (cut into column spans).
KL_SHAPES = [(64, 1000), (6, 32000), (2, 131072), (3, 128256)]
OFFSETS = [0.0, 10.0, 100.0, 1e4]


@pytest.mark.parametrize("shape", KL_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("with_grad", [False, True], ids=["loss", "loss+grad"])
def test_kl_forward_is_shift_invariant(kernels, shape, with_grad):
    for offset in OFFSETS:
        p, q = offset_rows(*shape, offset)
        rows = ops.kl_div_with_logits(p, q.requires_grad_(with_grad), reduction="none")
        assert max_rel_err(rows.detach(), kl_truth(p, q)) <= 1e-5, offset


def test_kl_shift_invariance_on_the_reference_backend():
    for offset in OFFSETS:
        p, q = offset_rows(6, 32000, offset)
        assert max_rel_err(ref.kl_rows(p, q), kl_truth(p, q)) <= 1e-5, offset


def test_kl_one_hot_teacher_with_a_huge_logit(kernels):
    p = torch.zeros(3, 32000)
    p[:, 5] = 1e4
    q = torch.randn(3, 32000, generator=torch.Generator().manual_seed(1))
    for rows in (ops.kl_div_with_logits(p, q, reduction="none"), ref.kl_rows(p, q)):
        assert max_rel_err(rows, kl_truth(p, q)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_kl_16bit_offset_rows(kernels, dtype):
    """16-bit logits are computed in float32: the error is float32's, far inside the 16-bit tolerance."""
    offset = 100.0 if dtype == torch.bfloat16 else 10.0  # within the dtype's range at a useful spacing
    p, q = offset_rows(4, 32000, offset, dtype=dtype)
    rows = ops.kl_div_with_logits(p, q, reduction="none")
    assert max_rel_err(rows, kl_truth(p, q)) <= 1e-4


@needs_ops
def test_kl_independent_of_thread_count_on_offset_rows():
    p, q = offset_rows(2, 131072, 1e4)
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(ops.kl_div_with_logits(p, q, reduction="none"))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


# ---------------------------------------------------------------------------------------------
# L2 norms over the whole range
# ---------------------------------------------------------------------------------------------
MAGNITUDES = {
    torch.float32: [torch.finfo(torch.float32).tiny, 1e-30, 1e-20, 1.0, 1e19, 1e30],
    torch.bfloat16: [1e-30, 1e-20, 1e20, 1e30],
    torch.float64: [torch.finfo(torch.float64).tiny, 1e-300, 1e-200, 1e200, 1e300],
}
CASES = [(d, m) for d, ms in MAGNITUDES.items() for m in ms]
CASE_IDS = [f"{str(d)[6:]}-{m:g}" for d, m in CASES]


def scaled_input(dtype, magnitude, shape=(3, 5, 70)):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (x * magnitude).to(dtype)


def check_unit_direction(out, x, norm, scale, mask=None, rtol=1e-5):
    """out = scale * x / ||x|| per group, checked in float64: each group's norm and its direction."""
    o, v = out.double(), x.double()
    if mask is not None:
        v = v * ref._mask_like(mask, v, torch.float64)
    # reduce in a dtype-independent way: scale v to O(1) first (v itself may square to inf in float64)
    vmax = ref.group_amax(v, norm)
    vs = v / torch.where(vmax > 0, vmax, torch.ones_like(vmax))
    expected = scale * vs / ref.group_sumsq(vs, norm).sqrt().clamp_min(1e-300)
    expected = torch.where(vmax > 0, expected, torch.zeros_like(expected))
    torch.testing.assert_close(o, expected, rtol=rtol, atol=rtol * abs(scale) * 1e-3)
    n = ref.group_sumsq(o, norm).sqrt()
    alive = vmax > 0
    assert torch.allclose(n[alive.expand_as(n)], torch.full_like(n, abs(scale))[alive.expand_as(n)], rtol=rtol)


@pytest.mark.parametrize("dtype,magnitude", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("norm", ["global", "sample", "token"])
def test_l2_normalize_gives_a_unit_direction_at_any_magnitude(kernels, dtype, magnitude, norm):
    x = scaled_input(dtype, magnitude)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 0, 1, 1, 1]], dtype=torch.bool)
    rtol = 1e-5 if dtype != torch.bfloat16 else 1e-2
    for scale in (1.0, 2.5):
        check_unit_direction(ops.l2_normalize(x, scale=scale, norm=norm), x, norm, scale, rtol=rtol)
        check_unit_direction(ref.l2_normalize(x, scale=scale, norm=norm), x, norm, scale, rtol=rtol)
        out = ops.l2_normalize(x, scale=scale, norm=norm, mask=mask)
        check_unit_direction(out, x, norm, scale, mask=mask, rtol=rtol)


@pytest.mark.parametrize("dtype,magnitude", CASES, ids=CASE_IDS)
def test_l2_normalize_with_baseline_at_any_magnitude(kernels, dtype, magnitude):
    x, b = scaled_input(dtype, magnitude), scaled_input(dtype, magnitude, shape=(3, 5, 70)).flip(-1)
    rtol = 1e-5 if dtype != torch.bfloat16 else 1e-2
    out = ops.l2_normalize(x, baseline=b, norm="sample")
    check_unit_direction(out, x.double() - b.double(), "sample", 1.0, rtol=rtol if dtype != torch.float32 else 1e-4)


def test_l2_normalize_of_zero_and_nonfinite_groups_is_unchanged(kernels):
    x = torch.randn(4, 33, generator=torch.Generator().manual_seed(0)) * 1e-30
    x[1] = 0.0
    x[2, 3] = float("nan")
    x[3, 4] = float("inf")
    for out in (ops.l2_normalize(x, norm="sample"), ref.l2_normalize(x, norm="sample")):
        assert torch.equal(out[1], torch.zeros(33))
        assert out[2, 3].isnan() and torch.equal(out[2, :3], torch.zeros(3))
        assert out[3, 4].isnan() and torch.equal(out[3, :4], torch.zeros(4))
        assert torch.allclose(out[0].double().norm(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-5)


def test_l2_normalize_on_normal_data_is_unchanged_by_the_scaling():
    """The power-of-two scaling cancels exactly: the reference equals the plain formula bit for bit."""
    x = torch.randn(4, 9, 31, generator=torch.Generator().manual_seed(0))
    for norm in ("global", "sample", "token"):
        ss = (x * x).sum() if norm == "global" else (
            (x * x).reshape(4, -1).sum(1).reshape(4, 1, 1) if norm == "sample" else (x * x).sum(-1, keepdim=True))
        plain = x * (1.5 / ss.double().sqrt()).float()
        assert torch.equal(ref.l2_normalize(x, scale=1.5, norm=norm), plain)


@pytest.mark.parametrize("dtype,magnitude", [(torch.float32, 1e-30), (torch.float32, 1e30), (torch.float64, 1e-300),
                                             (torch.float64, 1e300)], ids=["fp32-1e-30", "fp32-1e30", "fp64-1e-300",
                                                                           "fp64-1e300"])
@pytest.mark.parametrize("norm", ["global", "sample", "token"])
def test_l2_normalize_backward_at_any_magnitude(kernels, dtype, magnitude, norm):
    """d(x / ||x||)/dx is homogeneous of degree -1: the gradient at c*x is the gradient at x over c."""
    x = scaled_input(torch.float64, 1.0, shape=(3, 4, 6))
    g = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    xs = (x * magnitude).to(dtype).requires_grad_()
    (ops.l2_normalize(xs, norm=norm) * g.to(dtype)).sum().backward()
    x1 = (xs.detach().double() / magnitude).requires_grad_()
    (ref.l2_normalize(x1, norm=norm) * g).sum().backward()
    torch.testing.assert_close(xs.grad.double() * magnitude, x1.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("norm", ["global", "sample", "token"])
def test_l2_normalize_backward_independent_of_thread_count(norm):
    x = torch.randn(3, 40000, generator=torch.Generator().manual_seed(0)).requires_grad_()
    g = torch.randn(3, 40000, generator=torch.Generator().manual_seed(1))
    before = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            x.grad = None
            (ops.l2_normalize(x, norm=norm) * g).sum().backward()
            grads.append(x.grad.clone())
    finally:
        torch.set_num_threads(before)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


@pytest.mark.parametrize("dtype,magnitude", CASES, ids=CASE_IDS)
def test_perturb_direction_normalised_at_any_magnitude(kernels, dtype, magnitude):
    w = torch.zeros(7, 300, dtype=dtype)
    d = scaled_input(dtype, magnitude, shape=(7, 300))
    new = ops.perturb_(w, d, scale=0.5)
    check_unit_direction(new, d, "global", 0.5, rtol=1e-5 if dtype != torch.bfloat16 else 1e-2)
    assert torch.equal(w, new)  # weight += new, from zero
    wr = torch.zeros(7, 300, dtype=dtype)
    check_unit_direction(ref.perturb_(wr, d, 0.5), d, "global", 0.5, rtol=1e-5 if dtype != torch.bfloat16 else 1e-2)


# ---------------------------------------------------------------------------------------------
# the same cases on the ATen fallback of the CPU kernels
# ---------------------------------------------------------------------------------------------
FALLBACK_SCRIPT = textwrap.dedent(
    """
    import json, torch, torch.nn.functional as F
    from fastvat import ops
    res = {}
    g = torch.Generator().manual_seed(0)
    for rows, classes, spread in ((6, 32000, 0.5), (2, 131072, 0.01)):
        p0 = torch.randn(rows, classes, generator=g)
        q0 = p0 + spread * torch.randn(rows, classes, generator=g)
        for off in (10.0, 1e4):
            p, q = p0 + off, q0 - off
            lp, lq = F.log_softmax(p.double(), -1), F.log_softmax(q.double(), -1)
            t = (lp.exp() * (lp - lq)).sum(-1)
            r = ops.kl_div_with_logits(p, q, reduction="none").double()
            res[f"kl{classes}-{off:g}"] = ((r - t) / t).abs().max().item()
    for dtype, mag in ((torch.float32, 1e-30), (torch.float32, 1e30), (torch.float64, 1e-300), (torch.float64, 1e300)):
        x = (torch.randn(3, 500, dtype=torch.float64, generator=g) * mag).to(dtype)
        for norm in ("global", "sample", "token"):
            n = ops.l2_normalize(x, norm=norm, scale=2.0).double()
            nn_ = (n * n).sum() if norm == "global" else ((n * n).sum(1) if norm == "sample" else (n * n).sum(-1))
            res[f"l2-{dtype}-{mag:g}-{norm}"] = ((nn_.sqrt() - 2.0) / 2.0).abs().max().item()
        w = torch.zeros_like(x)
        nw = ops.perturb_(w, x, scale=2.0).double()
        res[f"perturb-{dtype}-{mag:g}"] = abs(nw.norm().item() - 2.0) / 2.0
    print(json.dumps(res))
    """
)


@needs_ops
def test_cpu_fallback_is_shift_invariant_and_robust():
    env = dict(os.environ, FASTVAT_CPU_SIMD="0")
    out = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    bad = {k: v for k, v in res.items() if not v <= 1e-5}
    assert not bad, bad
