"""Pure-PyTorch versions of every fastvat op.

They are the ground truth for the tests and benchmarks and the fallback when the compiled
extension is missing. They take already-validated arguments (see ``fastvat._checks``) and
compute in the accumulation dtype (float32 for half types, float64 for float64).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NORMS = ("global", "sample", "token")
# Elements per partial sum of a long norm group (as in the CPU kernels).
CHUNK = 16384
REDUCTIONS = ("batchmean", "mean", "sum", "none")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype fastvat accumulates in for tensors of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mask_like(mask: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A mask over the leading dims of x, viewed so it broadcasts against x."""
    trailing = x.dim() - mask.dim()
    return mask.to(dtype).reshape(mask.shape + (1,) * trailing)


def group_sum(t: torch.Tensor, norm: str) -> torch.Tensor:
    """Sum per norm group, shaped to broadcast against t, in an order fixed by the shape alone.

    Long groups are summed in chunks of ``CHUNK`` elements and the chunk sums added after, each
    reduction small enough to run on one thread: the result is the same for any number of threads.
    Token rows of up to ``CHUNK`` elements are summed directly: ATen splits a sum with many outputs
    between threads by outputs, and sums a single row that short on one thread.
    """
    if norm == "token":
        if t.dim() == 0 or t.shape[-1] <= CHUNK:
            return t.sum(-1, keepdim=True)
        flat = t.reshape(-1, t.shape[-1])
        groups = flat.shape[0]
    else:
        groups = 1 if norm == "global" else t.shape[0]
        flat = t.reshape(groups, -1)
    size = flat.shape[1]
    whole = size - size % CHUNK
    sums = flat[:, :whole].reshape(groups, -1, CHUNK).sum(-1)
    if whole < size:
        sums = torch.cat([sums, flat[:, whole:].sum(-1, keepdim=True)], dim=1)
    total = sums.sum(-1)
    if norm == "token":
        return total.reshape(t.shape[:-1] + (1,))
    if norm == "global":
        return total.reshape((1,) * t.dim())
    return total.reshape((t.shape[0],) + (1,) * (t.dim() - 1))


def group_sumsq(v: torch.Tensor, norm: str) -> torch.Tensor:
    """Sum of squares per norm group, shaped to broadcast against v."""
    return group_sum(v * v, norm)


def group_amax(v: torch.Tensor, norm: str) -> torch.Tensor:
    """max |v| per norm group, shaped to broadcast against v (NaN if the group holds one)."""
    a = v.abs()
    if norm == "global":
        return a.amax().reshape((1,) * v.dim())
    if norm == "sample":
        return a.reshape(v.shape[0], -1).amax(1).reshape((v.shape[0],) + (1,) * (v.dim() - 1))
    return a.amax(-1, keepdim=True)


def pow2_scaled(v: torch.Tensor, norm: str):
    """(t, s, usable): t = v * s per group, s the power of two that brings the group's max |v| into
    [0.5, 1), so that no square of t under- or overflows (as LAPACK's nrm2 scales). Scaling by a power
    of two is exact and cancels out of v / ||v||. usable: the group is finite and not all zero;
    other groups keep s = 1."""
    amax = group_amax(v, norm)
    usable = torch.isfinite(amax) & (amax > 0)
    _, ex = torch.frexp(torch.where(usable, amax, torch.ones_like(amax)))
    # clamped so that 2^-ex stays finite in v's dtype (a group of subnormals)
    ex = ex.clamp_min(-1021 if v.dtype == torch.float64 else -125)
    s = torch.ldexp(torch.ones_like(amax), -ex)
    return v * s, s, usable


def group_norm(v: torch.Tensor, norm: str) -> torch.Tensor:
    """||v|| per norm group, shaped to broadcast against v, in v's accumulation dtype. Taken on the
    power-of-two scaled v, so that it neither under- nor overflows where the norm itself is representable;
    a zero group gives 0, a group holding NaN/Inf its plain (non-finite) sum."""
    v = v.to(acc_dtype(v.dtype))
    if v.numel() == 0:
        return group_sumsq(v, norm).sqrt()
    t, s, usable = pow2_scaled(v, norm)
    return torch.where(usable, group_sumsq(t, norm).sqrt() / s, group_sumsq(v, norm).sqrt())


def l2_normalize(x, scale=1.0, norm="global", mask=None, baseline=None):
    """scale * v / ||v|| per group, v = (x - baseline) * mask; zero-norm groups give zeros."""
    dt = acc_dtype(x.dtype)
    v = x.to(dt)
    if baseline is not None:
        v = v - baseline.to(dt)
    if mask is not None:
        v = v * _mask_like(mask, x, dt)
    if v.numel() == 0:
        return v.to(x.dtype)
    t, _, usable = pow2_scaled(v, norm)
    ss = group_sumsq(t, norm)
    # sqrt of a safe value: sqrt'(0) is infinite, which would turn the zero gradient of a
    # zero-norm group (e.g. a fully masked sample) into NaN.
    # the factor in float64 (as the kernels compute it): exact whenever scale/||v|| is representable
    n = torch.where(usable, ss, torch.ones_like(ss)).double().sqrt()
    factor = torch.where(usable, scale / n, torch.zeros_like(n)).to(dt)
    return (t * factor).to(x.dtype)


def perturb_(weight, direction, scale, previous=None, out=None):
    """The article's in-place step: new = scale*d/||d|| (global), weight += new - previous."""
    # formed in the wider of the two dtypes, then stored in weight's (one rounding)
    wide = torch.promote_types(weight.dtype, direction.dtype)
    new = l2_normalize(direction.to(wide), scale=scale, norm="global").to(weight.dtype)
    if previous is not None:
        # one rounding: weight + (new - previous) in the accumulation dtype
        acc = acc_dtype(weight.dtype)
        weight.copy_((weight.to(acc) + (new.to(acc) - previous.to(acc))).to(weight.dtype))
    else:
        weight.add_(new)
    if out is not None:
        out.copy_(new)
        return out
    if previous is not None:
        previous.copy_(new)
        return previous
    return new


def restore_(weight, previous):
    """Undo the last perturb_: weight -= previous."""
    weight.sub_(previous)
    return weight


def kl_dtype(p_dtype: torch.dtype, q_dtype: torch.dtype) -> torch.dtype:
    """The dtype the KL of logits of these dtypes is computed in: the wider of the two (PyTorch's
    promotion), never q's when p is wider."""
    return torch.promote_types(p_dtype, q_dtype)


def _kl_parts(p_logits, q_logits):
    """The exact-difference form of KL(softmax(p) || softmax(q)) per row, in float64.

    With the row maxima mp, mq as shifts, a = p - mp, t = a - (q - mq) (= p - q up to a constant; a
    difference of two nearby logits is exact), e = e^a, Zp = sum e, A = sum e t and
    D = sum (e^(q - mq) - e) = Zq - Zp, whose terms are formed as e * expm1(-t) where |t| < 1:
    KL = A/Zp + log1p(D/Zp). Both sums keep their relative accuracy however close p and q are, so the
    first-order terms cancel in float64, not in the logits' dtype: the plain formula's rounding (an
    ulp of each log-sum-exp) is as large as a KL of 1e-7 in float32, and can make it negative.
    Returns (a, t, e, zp, L = log1p(D/Zp), kl), each row's values shaped to broadcast (keepdim).
    """
    P = p_logits.to(torch.float64)
    Q = q_logits.to(torch.float64)
    # the maxima are shifts the KL does not depend on: constants for autograd
    a = P - P.detach().amax(-1, keepdim=True)  # an all -inf row gives NaN: no distribution
    dq = Q - Q.detach().amax(-1, keepdim=True)
    t = a - dq
    e = a.exp()
    zero = torch.zeros((), dtype=torch.float64, device=P.device)
    zp = e.sum(-1, keepdim=True)
    # 0 * log 0 = 0: a class with p = -inf (probability 0) adds nothing, even where q = -inf too.
    # The branches not taken are fed zeros, so that their inf/NaN never reach a gradient.
    live = e != 0
    A = torch.where(live, e * torch.where(live, t, zero), zero).sum(-1, keepdim=True)
    near = t.abs() < 1
    D = torch.where(near, e * torch.expm1(-torch.where(near, t, zero)), dq.exp() - e).sum(-1, keepdim=True)
    L = torch.log1p(D / zp)
    kl = A / zp + L
    kl = torch.where(kl < 0, zero, kl)  # never negative; NaN stays NaN
    return a, dq, t, e, zp, D, L, kl


def kl_rows(p_logits, q_logits, mask=None):
    """Per-row KL(softmax(p) || softmax(q)) over the last dim, in the accumulation dtype of the wider
    of the two dtypes; differentiable in both arguments."""
    dt = acc_dtype(kl_dtype(p_logits.dtype, q_logits.dtype))
    if mask is not None:
        # a masked row is exactly 0 with a zero gradient, even when its logits are garbage (NaN,
        # all -inf) as in padding: it is computed on zeros instead
        keep = mask.reshape(q_logits.shape[:-1] + (1,)) != 0
        p_logits = torch.where(keep, p_logits, torch.zeros_like(p_logits))
        q_logits = torch.where(keep, q_logits, torch.zeros_like(q_logits))
    rows = _kl_parts(p_logits, q_logits)[-1].squeeze(-1)
    if mask is not None:
        rows = rows * mask.to(torch.float64).reshape(rows.shape)
    return rows.to(dt)


def kl_grads(p_logits, q_logits, mask=None, *, want_p=True, want_q=True):
    """(d KL / d p, d KL / d q) per row, float64, each accurate relative to its own size (None where
    not wanted): d/dq = softmax(q) - softmax(p) = pi * expm1(-t - L) (exactly 0 where p = q), and
    d/dp = pi * (d - sum pi d), d = p - q, = pi * (t - A/Zp). Where |t + L| >= 1 there is no cancellation
    and d/dq is formed plainly. Masked rows are computed on zeros and scaled by the mask."""
    keep = None
    if mask is not None:
        keep = mask.reshape(q_logits.shape[:-1] + (1,)) != 0
        p_logits = torch.where(keep, p_logits, torch.zeros_like(p_logits))
        q_logits = torch.where(keep, q_logits, torch.zeros_like(q_logits))
    a, dq, t, e, zp, D, L, _ = _kl_parts(p_logits, q_logits)
    zero = torch.zeros((), dtype=torch.float64, device=e.device)
    pi = e / zp
    gp = gq = None
    if want_q:
        x = dq - a - L
        near = x.abs() < 1
        gq = torch.where(near, pi * torch.expm1(torch.where(near, x, zero)), dq.exp() / (zp + D) - pi)
    if want_p:
        live = e != 0
        m = torch.where(live, pi * torch.where(live, t, zero), zero).sum(-1, keepdim=True)
        gp = torch.where(live, pi * (torch.where(live, t, zero) - m), zero)
    if mask is not None:
        w = mask.to(torch.float64).reshape(keep.shape)
        gp = None if gp is None else torch.where(keep, gp * w, zero)
        gq = None if gq is None else torch.where(keep, gq * w, zero)
    return gp, gq


def reduce_rows(rows, reduction, batch_size, mask=None):
    """batchmean: sum / batch size (dim 0); mean: sum / number of (unmasked) rows."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / max(batch_size, 1)
    count = mask.to(rows.dtype).sum() if mask is not None else torch.tensor(float(rows.numel()), dtype=rows.dtype)
    return total / count.clamp_min(1)


def kl_div_with_logits(p_logits, q_logits, mask=None, reduction="batchmean"):
    rows = kl_rows(p_logits, q_logits, mask)
    batch = p_logits.shape[0] if p_logits.dim() > 1 else 1
    return reduce_rows(rows, reduction, batch, mask)


def embedding_gather_add(weight, ids, delta, delta_index, padding_idx=-1):
    """weight[ids] + delta[delta_index]: the out-of-place weight-target perturbation."""
    pad = None if padding_idx is None or padding_idx < 0 else padding_idx
    return F.embedding(ids, weight, padding_idx=pad) + delta[delta_index]


def linear_kl_div(h_p, h_q, weight, bias=None, mask=None, reduction="batchmean"):
    """kl_div_with_logits(h_p W^T + b, h_q W^T + b), the logits materialised; mask over h's leading dims.

    Masked rows are computed on zero hidden states, so that garbage there (NaN, inf) reaches neither
    the loss nor any gradient (a NaN row times a zero gradient would still poison weight's gradient).
    """
    if mask is not None:
        keep = _mask_like(mask, h_q, h_q.dtype) != 0
        h_p = torch.where(keep, h_p, torch.zeros_like(h_p))
        h_q = torch.where(keep, h_q, torch.zeros_like(h_q))
    # p is a constant: its logits give weight and bias no gradient
    p_logits = F.linear(h_p.detach(), weight, bias).detach()
    q_logits = F.linear(h_q, weight, bias)
    return kl_div_with_logits(p_logits, q_logits, mask, reduction)
