"""``l2_normalize``: one L2 norm per group (global, per sample, per token), masks, a fused baseline."""
from __future__ import annotations

import torch

from fastvat import _checks
from fastvat import reference as ref
from fastvat.ops._backend import HAVE_KERNELS, use_kernel

NORMS = ref.NORMS


def l2_normalize(x: torch.Tensor, *, scale: float = 1.0, norm: str = "global", mask: torch.Tensor | None = None,
                 baseline: torch.Tensor | None = None) -> torch.Tensor:
    """``scale * v / ||v||`` with ``v = (x - baseline) * mask``, one L2 norm per group.

    norm: ``"global"`` one norm over the whole tensor; ``"sample"`` one per index of dim 0;
    ``"token"`` one per vector along the last dim. mask: bool or 0/1 over leading dims of x
    (e.g. ``[B, T]`` for ``[B, T, H]``); masked positions are zero and stay out of the norm.
    baseline: optional tensor of x's shape; fuses the finite-difference form ``x - baseline``.
    The output has x's dtype, or with a baseline ``torch.promote_types(x.dtype, baseline.dtype)``
    (the dtype of ``x - baseline``): a baseline of another dtype is never rounded to x's, where the
    difference of two close tensors would lose its digits. A group whose norm is zero gives zeros
    (never NaN). Differentiable in x and baseline.

    Returns:
        A tensor of x's shape, in x's dtype (with a baseline: the promoted dtype above).

    Raises:
        TypeError: x, mask or baseline of the wrong kind or dtype; scale not a real number.
        ValueError: an unknown norm, a non-finite scale, or a mask/baseline of the wrong shape or device.
    """
    _checks.tensor("x", x, floating=True)
    scale = _checks.finite_number("scale", scale)
    _checks.choice("norm", norm, NORMS)
    if norm in ("sample", "token") and x.dim() == 0:
        raise ValueError(f"x must have at least one dim for norm={norm!r}, got a 0-dim tensor")
    if baseline is not None:
        _checks.tensor("baseline", baseline, floating=True)
        _checks.same_device("baseline", baseline, "x", x)
        _checks.same_shape("baseline", baseline, "x", x)
    if baseline is not None and baseline.dtype != x.dtype:
        # both widened (exactly) to the dtype of x - baseline: the kernels take one dtype
        wide = torch.promote_types(x.dtype, baseline.dtype)
        x, baseline = x.to(wide), baseline.to(wide)
    if mask is not None:
        mask = _checks.leading_mask(mask, x)
    if not use_kernel(x):
        return ref.l2_normalize(x, scale=scale, norm=norm, mask=mask, baseline=baseline)
    return torch.ops.fastvat.l2_normalize(x, baseline, mask, scale, norm)


def _l2_normalize_backward_math(grad, x, baseline, mask, scale, norm):
    """d/dv of s*v/||v|| is (s/||v||)(I - u u^T), u = v/||v||; zero where ||v|| = 0.

    v is scaled by a power of two per group first (reference.pow2_scaled), so that tiny and huge
    groups have a norm; group sums run in a fixed order, so the result does not depend on threads.
    """
    dt = ref.acc_dtype(x.dtype)
    v = x.to(dt)
    if baseline is not None:
        v = v - baseline.to(dt)
    m = None
    if mask is not None:
        m = ref._mask_like(mask, x, dt)
        v = v * m
    g = grad.to(dt)
    if m is not None:
        g = g * m
    t, s, usable = ref.pow2_scaled(v, norm)
    nt = torch.where(usable, ref.group_sumsq(t, norm), torch.ones_like(s)).sqrt()
    u = t / nt
    # s/||v|| = s * 2^-e / ||t||, formed in float64 where a tiny group's factor still fits
    coef = torch.where(usable, (scale * s.double()) / nt.double(), torch.zeros_like(nt, dtype=torch.float64)).to(dt)
    gv = coef * (g - u * ref.group_sum(u * g, norm))
    if m is not None:
        gv = gv * m
    return gv


def _l2_setup(ctx, inputs, output):
    x, baseline, mask, scale, norm = inputs
    ctx.scale, ctx.norm = scale, norm
    ctx.has_baseline = baseline is not None
    ctx.save_for_backward(x, baseline, mask)


def _l2_backward(ctx, grad):
    x, baseline, mask = ctx.saved_tensors
    if grad.numel() == 0:
        gv = torch.zeros_like(x, dtype=ref.acc_dtype(x.dtype))
    else:
        gv = _l2_normalize_backward_math(grad, x, baseline, mask, ctx.scale, ctx.norm)
    gx = gv.to(x.dtype) if ctx.needs_input_grad[0] else None
    gb = (-gv).to(baseline.dtype) if ctx.has_baseline and ctx.needs_input_grad[1] else None
    return gx, gb, None, None, None


if HAVE_KERNELS:

    @torch.library.register_fake("fastvat::l2_normalize")
    def _l2_fake(x, baseline, mask, scale, norm):
        torch._check(norm in NORMS, lambda: f"norm must be one of {NORMS}, got {norm!r}")
        if baseline is not None:
            torch._check(baseline.shape == x.shape, lambda: "baseline must have x's shape")
        if mask is not None:
            torch._check(mask.dim() <= x.dim() and tuple(mask.shape) == tuple(x.shape[: mask.dim()]),
                         lambda: "mask must cover leading dims of x")
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    torch.library.register_autograd("fastvat::l2_normalize", _l2_backward, setup_context=_l2_setup)
