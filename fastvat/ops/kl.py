"""``kl_div_with_logits``: KL between the softmaxes of two logits tensors, its gradient formed in the forward pass."""
from __future__ import annotations

import torch

from fastvat import _checks, _torch_internals
from fastvat import reference as ref
from fastvat.ops._backend import HAVE_KERNELS, use_kernel

REDUCTIONS = ref.REDUCTIONS


def kl_div_with_logits(p_logits: torch.Tensor, q_logits: torch.Tensor, *, mask: torch.Tensor | None = None,
                       reduction: str = "batchmean") -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) over the last dim.

    Gradients flow to q_logits, and to p_logits only when it requires grad (so KL(q || p) is this op
    with its arguments swapped); the usual call with a detached p pays nothing for it.
    Logits of two dtypes are computed in the wider one (``torch.promote_types``); each gradient comes
    back in its own argument's dtype. The KL and both gradients are accurate relative to their own
    size, also for nearby distributions (the VAT regime), and the KL is never negative.

    reduction: ``"batchmean"`` the sum over rows / ``q_logits.shape[0]`` for logits of two or more
    dims (as ``F.kl_div``); 1-D logits are a single distribution, whose batchmean is its sum (``F.kl_div``
    would divide a 1-D input by its number of classes). ``"mean"`` sum / number of unmasked rows,
    ``"sum"``, or ``"none"`` (one value per row, shape ``q_logits.shape[:-1]``).
    mask: bool or 0/1 over the leading dims of the logits (not the class dim), or over the first few
    of them: a ``[B]`` mask on ``[B, T, C]`` logits masks whole samples, all T rows of each (so
    ``"mean"`` counts T rows per kept sample). Masked rows count 0.
    Logits with no classes (last dim 0) are a ValueError.
    mask entries must be finite and >= 0 (a ValueError otherwise); they weight the rows in float32
    (float64 for float64 logits), not in the logits' dtype.
    The loss is float32 for half inputs (float64 for float64). The gradient w.r.t. q_logits is
    computed in the forward pass; backward only scales it.

    Returns:
        The loss: 0-dim, or ``q_logits.shape[:-1]`` for ``"none"``.

    Raises:
        TypeError: non-floating-point logits, or a mask of the wrong dtype.
        ValueError: logits of different shapes or devices, no classes, an unknown reduction, or a
            mask that does not cover the leading dims or holds a NaN, inf or negative entry.
    """
    _checks.tensor("p_logits", p_logits, floating=True)
    _checks.tensor("q_logits", q_logits, floating=True)
    _checks.same_device("p_logits", p_logits, "q_logits", q_logits)
    _checks.same_shape("p_logits", p_logits, "q_logits", q_logits)
    _checks.choice("reduction", reduction, REDUCTIONS)
    if q_logits.dim() == 0:
        raise ValueError("q_logits must have a class dim (at least 1-D), got a 0-dim tensor")
    if q_logits.shape[-1] == 0:
        # softmax over no classes is no distribution: the kernels cannot take it and the reference
        # would quietly give zeros
        raise ValueError(
            f"q_logits has no classes: shape {tuple(q_logits.shape)} has a last (class) dim of size 0"
        )
    lead = tuple(q_logits.shape[:-1])
    if mask is not None:
        mask = _checks.row_mask(mask, q_logits, x_name="q_logits", feature="class")
    batch = q_logits.shape[0] if q_logits.dim() > 1 else 1
    if not use_kernel(q_logits):
        return ref.kl_div_with_logits(p_logits, q_logits, mask=mask, reduction=reduction)
    classes = q_logits.shape[-1]
    dt = ref.kl_dtype(p_logits.dtype, q_logits.dtype)
    # the wider dtype for both (never rounding the other down); .to's backward returns each gradient
    # in its argument's own dtype
    p2 = (p_logits if p_logits.requires_grad else p_logits.detach()).reshape(-1, classes).to(dt)
    q2 = q_logits.reshape(-1, classes).to(dt)
    mask_flat = None if mask is None else mask.reshape(-1).to(ref.acc_dtype(dt))
    compute_grad = torch.is_grad_enabled() and q_logits.requires_grad
    rows, _ = torch.ops.fastvat.kl_div_with_logits(p2, q2, mask_flat, compute_grad)
    rows = rows.reshape(lead)
    return ref.reduce_rows(rows, reduction, batch, mask)


def _kl_setup(ctx, inputs, output):
    p, q, mask, compute_grad = inputs
    _, grad = output
    ctx.save_for_backward(p, q, mask)
    # The gradient output is a buffer for backward, not a differentiable result. It is kept on ctx
    # (not saved) so that backward can scale it in place: the [N, C] gradient is then allocated once.
    # Being non-differentiable it has no grad_fn, so ctx -> grad makes no reference cycle.
    ctx.mark_non_differentiable(grad)
    ctx.grad = grad
    # Without this, autograd would hand backward an [N, C] tensor of zeros for the unused output.
    ctx.set_materialize_grads(False)


def _kl_backward(ctx, grad_rows, _grad_of_grad):
    p, q, mask = ctx.saved_tensors
    grad, ctx.grad = ctx.grad, None  # used once; a second backward (retain_graph) recomputes
    if grad_rows is None:
        return None, None, None, None
    want_p, want_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if torch.is_grad_enabled():
        # Double backward (create_graph=True): recompute differentiably, in float64.
        gp, gq = ref.kl_grads(p, q, mask, want_p=want_p, want_q=want_q)
        scale = grad_rows.to(torch.float64).unsqueeze(-1)
        return (None if gp is None else (gp * scale).to(p.dtype),
                None if gq is None else (gq * scale).to(q.dtype), None, None)
    gp = None
    if want_p:
        # d KL / d p = softmax(p) * (d - sum softmax(p) d), d = p - q: only for a p that requires grad
        gp, _ = ref.kl_grads(p, q, mask, want_p=True, want_q=False)
        gp = (gp * grad_rows.to(torch.float64).unsqueeze(-1)).to(p.dtype)
    if not want_q:
        return gp, None, None, None
    if grad is None or grad.numel() != q.numel():
        # A second backward (retain_graph), or no gradient from the forward: the kernel again.
        _, grad = torch.ops.fastvat.kl_div_with_logits(p.detach(), q.detach(), mask, True)
    scale = grad_rows.unsqueeze(-1).to(grad.dtype)
    if type(grad) is torch.Tensor and _torch_internals.dispatch_stack_empty():
        return gp, grad.mul_(scale), None, None  # eager: reuse the forward's buffer
    return gp, grad * scale, None, None  # traced (fake/functional tensors): no mutation


if HAVE_KERNELS:

    @torch.library.register_fake("fastvat::kl_div_with_logits")
    def _kl_fake(p, q, mask, compute_grad):
        torch._check(q.dim() == 2, lambda: f"q_logits must be 2-D [N, C], got {q.dim()} dims")
        torch._check(p.shape == q.shape, lambda: "p_logits must have q_logits' shape")
        if mask is not None:
            torch._check(mask.numel() == q.shape[0], lambda: "mask must have one entry per row")
        rows = q.new_empty(q.shape[:-1], dtype=ref.acc_dtype(q.dtype))
        grad = torch.empty_like(q, memory_format=torch.contiguous_format) if compute_grad else q.new_empty((0,))
        return rows, grad

    torch.library.register_autograd("fastvat::kl_div_with_logits", _kl_backward, setup_context=_kl_setup)
