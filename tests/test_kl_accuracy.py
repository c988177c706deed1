"""kl_div_with_logits against float64 truth where the usual formula loses it: logits of two dtypes,
nearby distributions (tiny KLs, the VAT/R3F regime), the gradient w.r.t. the first argument, KLs
near float32's largest value, and mask weights. Every case on both paths (the kernels and the
reference); the ATen fallback of the CPU op in a subprocess.
"""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastvat import ops
from fastvat import reference as ref

from op_helpers import COMPILED, DEVICES, randn


@pytest.fixture(params=["kernels", "reference"])
def kl_backend(request, monkeypatch):
    if request.param == "kernels" and not COMPILED:
        pytest.skip("compiled kernels not loaded (reference backend)")
    if request.param == "reference":
        monkeypatch.setattr(ops._backend, "HAVE_KERNELS", False)
    return request.param


def truth(p, q):
    """Per-row KL(softmax(p) || softmax(q)) and its gradients w.r.t. q and p, in float64, of the given
    values, centred on m = sum pi d rather than on the row maxima as the op is:
    KL = log1p(sum pi expm1(-(d - m))), d/dq = pi expm1(-(d - m) - KL), d/dp = pi (d - m).
    d = (p - max p) - (q - max q): p - q up to a constant, exact, and of the size of p - q's spread
    (p - q of offset rows would put an ulp of the offset into m, as large as a KL of 1e-11)."""
    P, Q = p.detach().double().cpu(), q.detach().double().cpu()
    pi = torch.softmax(P, -1)
    d = (P - P.amax(-1, keepdim=True)) - (Q - Q.amax(-1, keepdim=True))
    d = torch.where(pi == 0, torch.zeros_like(d), d)
    m = (pi * d).sum(-1, keepdim=True)
    kl = torch.log1p((pi * torch.expm1(-(d - m))).sum(-1, keepdim=True))
    gq = pi * torch.expm1(-(d - m) - kl)
    gp = pi * (d - m)
    return kl.squeeze(-1), gq, gp


def rel_err(a, b):
    """Norm-wise relative error of a against b (per row for 2-D: the largest)."""
    a, b = a.detach().double().cpu(), b.double()
    return ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-300)).max().item()


# (shape, offset of p (q gets the opposite), noise scale): a BERT vocabulary, a 128k-class head (the CPU
# kernel's column-span split), rows shifted apart by +-50 and +-1e4 (where 1e-5 is below the logits' ulp)
NEAR_CASES = [
    ((4, 10), 0.0, 1e-5),
    ((16, 1000), 0.0, 1e-5),
    ((3, 30522), 0.0, 1e-5),
    ((3, 30522), 50.0, 1e-5),
    ((2, 131072), 0.0, 1e-5),
    ((2, 3, 517), 1e4, 1e-2),
]


def near_pair(shape, offset, noise, dtype, device, seed=0):
    x = randn(*shape, dtype=torch.float64, seed=seed, scale=2.0)
    n = randn(*shape, dtype=torch.float64, seed=seed + 1)
    p = (x + offset).to(dtype)
    q = (x + noise * n - offset).to(dtype)
    return p.to(device), q.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape,offset,noise", NEAR_CASES, ids=lambda v: str(v))
def test_tiny_kl_is_accurate_relative_to_its_size(kl_backend, device, dtype, shape, offset, noise):
    """q = p + 1e-5 noise: the KL (~1e-10) within 1e-3 of the float64 KL of the same values, never
    negative; the gradients w.r.t. q and p within 1e-3 of their own (tiny) size."""
    p, q = near_pair(shape, offset, noise, dtype, device)
    p.requires_grad_()
    q.requires_grad_()
    rows = ops.kl_div_with_logits(p, q, reduction="none")
    kl, gq, gp = truth(p, q)
    assert (rows >= 0).all()
    assert kl.min() > 0
    assert rel_err(rows.reshape(-1, 1), kl.reshape(-1, 1)) <= 1e-3
    g_p, g_q = torch.autograd.grad(rows.sum(), (p, q))
    assert rel_err(g_q, gq) <= 1e-3
    assert rel_err(g_p, gp) <= 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(4, 10), (3, 30522), (2, 131072)], ids=lambda s: "x".join(map(str, s)))
def test_equal_logits_give_exactly_zero(kl_backend, device, shape):
    p = randn(*shape, device=device, scale=3.0)
    p[0, :3] = float("-inf")  # classes of probability 0 keep it exact
    q = p.clone().requires_grad_()
    p.requires_grad_()
    rows = ops.kl_div_with_logits(p, q, reduction="none")
    assert (rows == 0).all()
    g_p, g_q = torch.autograd.grad(rows.sum(), (p, q))
    assert (g_q == 0).all() and (g_p == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qdtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_mixed_dtypes_compute_in_the_wider(kl_backend, device, qdtype):
    """p float32, q 16-bit: computed in float32 (not p rounded to q's dtype), each gradient in its own
    argument's dtype."""
    x = randn(6, 50, device=device, scale=2.0)
    for p, q in [(x, x.to(qdtype)), (x, (x + 0.3 * randn(6, 50, device=device, seed=2)).to(qdtype))]:
        p = p.clone().requires_grad_()
        q = q.clone().requires_grad_()
        rows = ops.kl_div_with_logits(p, q, reduction="none")
        kl, gq, gp = truth(p, q)
        assert rows.dtype == torch.float32
        assert rel_err(rows.reshape(-1, 1), kl.reshape(-1, 1)) <= 1e-3
        g_p, g_q = torch.autograd.grad(rows.sum(), (p, q))
        assert g_p.dtype == torch.float32 and g_q.dtype == qdtype
        assert rel_err(g_q.float(), gq) <= 1e-2  # q's gradient rounded to q's dtype
        assert rel_err(g_p, gp) <= 1e-3
        # either order of the arguments
        rows2 = ops.kl_div_with_logits(q.detach(), p.detach(), reduction="none")
        kl2, _, _ = truth(q, p)
        assert rel_err(rows2.reshape(-1, 1), kl2.reshape(-1, 1)) <= 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kl_near_float32_max_is_finite(kl_backend, device, dtype):
    """A KL of 3.09e38 fits in float32: its logits' differences overflow float32, not the result."""
    big = 3.09e38 if dtype == torch.float32 else 3.0e38
    p = torch.zeros(2, 2, dtype=dtype, device=device)
    q = torch.tensor([[big, -big], [1.0, -1.0]], dtype=dtype, device=device)
    rows = ops.kl_div_with_logits(p, q, reduction="none")
    # the plain float64 formula: no cancellation to fear here, and nothing overflows float64
    lp, lq = torch.log_softmax(p.double().cpu(), -1), torch.log_softmax(q.double().cpu(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    assert kl[0] > 3e38 and torch.isfinite(rows).all(), rows
    assert rel_err(rows.reshape(-1, 1), kl.reshape(-1, 1)) <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_mask_weights_keep_the_accumulation_dtype(kl_backend, device, dtype):
    """A mask of 0.3 weighs a bf16 row by 0.3 (float32), not by bf16's 0.30078."""
    p = randn(3, 40, dtype=dtype, device=device, scale=2.0)
    q = randn(3, 40, dtype=dtype, device=device, seed=1, scale=2.0)
    mask = torch.tensor([0.3, 1.0, 0.7], dtype=torch.float64, device=device)
    rows = ops.kl_div_with_logits(p, q, mask=mask, reduction="none")
    kl, _, _ = truth(p, q)
    torch.testing.assert_close(rows.double().cpu(), kl * mask.cpu(), rtol=2e-6, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5])
def test_mask_refuses_nan_inf_and_negative_entries(kl_backend, bad):
    p, q = randn(3, 5), randn(3, 5, seed=1)
    with pytest.raises(ValueError, match="mask"):
        ops.kl_div_with_logits(p, q, mask=torch.tensor([1.0, bad, 0.0]))
    with pytest.raises(ValueError, match="mask"):
        ops.linear_kl_div(randn(3, 4), randn(3, 4, seed=1), randn(5, 4, seed=2), mask=torch.tensor([1.0, bad, 0.0]))


def test_gradcheck_both_arguments(kl_backend):
    """gradcheck (float64) of the gradients w.r.t. both arguments, and gradgradcheck, with a mask."""
    p = randn(3, 7, dtype=torch.float64, scale=2.0).requires_grad_()
    q = randn(3, 7, dtype=torch.float64, seed=1, scale=2.0).requires_grad_()
    mask = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)

    def f(a, b):
        return ops.kl_div_with_logits(a, b, mask=mask, reduction="none")

    assert torch.autograd.gradcheck(f, (p, q))
    assert torch.autograd.gradgradcheck(f, (p, q))
    # p alone (q constant): the reverse KL's case
    assert torch.autograd.gradcheck(lambda a: f(a, q.detach()), (p,))


def test_p_gradient_only_when_p_requires_grad(kl_backend):
    p = randn(3, 7, scale=2.0)
    q = randn(3, 7, seed=1, scale=2.0).requires_grad_()
    loss = ops.kl_div_with_logits(p, q)
    (g,) = torch.autograd.grad(loss, q)
    assert p.grad is None and g.shape == q.shape


@pytest.mark.skipif(not COMPILED, reason="compiled kernels not loaded")
def test_cpu_fallback_tiny_kl_and_overflow():
    """The ATen fallback (CPUs without AVX2/FMA) uses the same exact-difference form."""
    code = textwrap.dedent(
        """
        import torch
        from fastvat import ops
        g = torch.Generator().manual_seed(0)
        x = torch.randn(3, 30522, generator=g, dtype=torch.float64) * 2
        p = x.float()
        q = (x + 1e-5 * torch.randn(3, 30522, generator=g, dtype=torch.float64)).float().requires_grad_()
        rows = ops.kl_div_with_logits(p, q, reduction="none")
        (gq,) = torch.autograd.grad(rows.sum(), q)
        P, Q = p.double(), q.detach().double()
        pi = torch.softmax(P, -1)
        d = P - Q
        m = (pi * d).sum(-1, keepdim=True)
        kl = torch.log1p((pi * torch.expm1(-(d - m))).sum(-1, keepdim=True))
        tg = pi * torch.expm1(-(d - m) - kl)
        assert ((rows.double() - kl.squeeze(-1)).abs() / kl.squeeze(-1)).max() < 1e-3, (rows, kl)
        assert ((gq.double() - tg).norm(dim=-1) / tg.norm(dim=-1)).max() < 1e-3
        z = torch.zeros(1, 2)
        r = ops.kl_div_with_logits(z, torch.tensor([[3.09e38, -3.09e38]]), reduction="none")
        assert torch.isfinite(r).all(), r
        s = ops.kl_div_with_logits(p, p.clone().requires_grad_(), reduction="none")
        assert (s == 0).all()
        print("fallback ok")
        """
    )
    env = dict(os.environ, FASTVAT_CPU_SIMD="0", CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "fallback ok" in res.stdout, res.stdout + res.stderr


def test_truth_matches_high_precision():
    """The float64 truth above agrees with 50-digit arithmetic on a small tiny-KL case."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    p, q = near_pair((2, 9), 50.0, 1e-5, torch.float32, "cpu")
    kl, _, _ = truth(p, q)
    for r in range(2):
        ps = [mpmath.mpf(float(v)) for v in p[r].double()]
        qs = [mpmath.mpf(float(v)) for v in q[r].double()]
        lp = mpmath.log(sum(mpmath.e ** v for v in ps))
        lq = mpmath.log(sum(mpmath.e ** v for v in qs))
        exact = sum(mpmath.e ** (a - lp) * ((a - lp) - (b - lq)) for a, b in zip(ps, qs))
        assert math.isclose(kl[r].item(), float(exact), rel_tol=1e-6)


# ---------------------------------------------------------------------------------------------
# R3F's symmetric term at tiny noise: KL(p || q) + KL(q || p), the second the op with its arguments
# swapped, against the same model in float64 with the same noise
# ---------------------------------------------------------------------------------------------
def _same_noise_in_any_dtype(monkeypatch):
    """The noise drawn in float32 whatever the model's dtype, so that the float32 and float64 runs see
    the same draw (torch.randn gives other values in float64)."""
    from fastvat import _targets

    def randn(self, shape, like):
        r = torch.randn(shape, generator=self.generator, device=like.device, dtype=torch.float32)
        return r.to(ref.acc_dtype(like.dtype))

    monkeypatch.setattr(_targets.Target, "_randn", randn)


@pytest.mark.parametrize("symmetric", [False, True], ids=["one_sided", "symmetric"])
def test_r3f_tiny_noise_matches_the_float64_model(kl_backend, monkeypatch, symmetric):
    """sigma = 1e-5 noise (KLs of ~3e-12): the float32 model's loss within 10 % of the float64 model's
    (the same weights and noise), and positive; each half alone too (two wrong halves can cancel)."""
    import fastvat
    from models import mlp

    _same_noise_in_any_dtype(monkeypatch)
    x = randn(32, 16, seed=3)
    losses = {}
    for dt in (torch.float32, torch.float64):
        model = mlp([16, 64, 10], dtype=dt, seed=0)
        r = fastvat.RandomNoise(model, sigma=1e-5, symmetric=symmetric, generator=torch.Generator().manual_seed(5))
        losses[dt] = r(x.to(dt))
    l32, l64 = losses[torch.float32].item(), losses[torch.float64].item()
    assert l64 > 0 and l32 > 0, (l32, l64)
    assert abs(l32 - l64) <= 0.1 * l64, (l32, l64)


@pytest.mark.parametrize("with_head", [False, True], ids=["logits", "head"])
def test_reverse_kl_is_accurate_for_nearby_distributions(kl_backend, with_head):
    """_lm_head.reverse_kl (R3F's KL(q || p)), on logits and through a vocabulary head: within 1e-3 of the
    float64 KL of the same float32 logits, and its gradient w.r.t. q within 1e-3."""
    from fastvat._lm_head import reverse_kl

    head = None
    if with_head:
        torch.manual_seed(0)
        head = torch.nn.Linear(24, 3001)
        hp = randn(4, 5, 24, seed=1)
        hq = (hp.double() + 1e-5 * randn(4, 5, 24, seed=2, dtype=torch.float64)).float().requires_grad_()
        with torch.no_grad():
            lp, lq = head(hp), head(hq)
        p, q = hp, hq
    else:
        lp, lq = near_pair((4, 5, 3001), 0.0, 1e-5, torch.float32, "cpu")
        p, q = lp, lq.clone().requires_grad_()
    mask = torch.ones(4, 5)
    mask[1, 2:] = 0
    rows = reverse_kl(p, q, mask, "none", head=head)
    kl, _, _ = truth(lq, lp)  # KL(q || p): q is the first argument
    kl = kl * mask.double()
    keep = mask.reshape(-1) != 0
    assert (rows >= 0).all() and (rows[mask == 0] == 0).all()
    assert rel_err(rows.reshape(-1, 1)[keep], kl.reshape(-1, 1)[keep]) <= 1e-3
    if not with_head:
        (g,) = torch.autograd.grad(rows.sum(), q)
        _, _, gp_first = truth(lq, lp)  # d KL(q || p) / d q: the first argument's gradient
        gp_first = gp_first * mask.double().unsqueeze(-1)
        assert rel_err(g.reshape(-1, 3001)[keep], gp_first.reshape(-1, 3001)[keep]) <= 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["no_offset", "offset_1e4"])
@pytest.mark.parametrize("C", [1000, 30522])
def test_kls_around_the_fast_path_threshold(kl_backend, device, C, offset):
    """KLs of 1e-3 to 0.1, on both sides of where the kernels switch from the one-pass float formula to
    the exact-difference pass: within 1e-3 relative (the float path measures ~5e-5 at worst here)."""
    x = randn(8, C, dtype=torch.float64, scale=8.0)
    n = randn(8, C, dtype=torch.float64, seed=1)
    for s in (0.05, 0.14, 0.2, 0.5):
        p, q = (x + offset).float().to(device), (x + s * n - offset).float().to(device).requires_grad_()
        rows = ops.kl_div_with_logits(p, q, reduction="none")
        kl, gq, _ = truth(p, q)
        assert rel_err(rows.reshape(-1, 1), kl.reshape(-1, 1)) <= 1e-3
        (g,) = torch.autograd.grad(rows.sum(), q)
        assert rel_err(g, gq) <= 1e-3
