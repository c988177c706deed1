"""``kl_div_with_logits``: KL between the softmaxes of two logits tensors, its gradient formed in the forward pass."""
from __future__ import annotations

import torch

from fastvat import _checks
from fastvat import reference as ref
from fastvat.ops._backend import HAVE_KERNELS, use_kernel

REDUCTIONS = ref.REDUCTIONS


def kl_div_with_logits(p_logits: torch.Tensor, q_logits: torch.Tensor, *, mask: torch.Tensor | None = None,
                       reduction: str = "batchmean") -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) over the last dim; p is a constant (no gradient).

    reduction: ``"batchmean"`` the sum over rows / ``q_logits.shape[0]`` for logits of two or more
    dims (as ``F.kl_div``); 1-D logits are a single distribution, whose batchmean is its sum (``F.kl_div``
    would divide a 1-D input by its number of classes). ``"mean"`` sum / number of unmasked rows,
    ``"sum"``, or ``"none"`` (one value per row, shape ``q_logits.shape[:-1]``).
    mask: bool or 0/1 over the leading dims of the logits (not the class dim), or over the first few
    of them: a ``[B]`` mask on ``[B, T, C]`` logits masks whole samples, all T rows of each (so
    ``"mean"`` counts T rows per kept sample). Masked rows count 0.
    Logits with no classes (last dim 0) are a ValueError.
    The loss is float32 for half inputs (float64 for float64). The gradient w.r.t. q_logits is
    computed in the forward pass; backward only scales it.

    Returns:
        The loss: 0-dim, or ``q_logits.shape[:-1]`` for ``"none"``.

    Raises:
        TypeError: non-floating-point logits, or a mask of the wrong dtype.
        ValueError: logits of different shapes or devices, no classes, an unknown reduction, or a
            mask that does not cover the leading dims.
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
    p2 = p_logits.detach().reshape(-1, classes)
    q2 = q_logits.reshape(-1, classes)
    if p2.dtype != q2.dtype:
        p2 = p2.to(q2.dtype)
    mask_flat = None if mask is None else mask.reshape(-1).to(ref.acc_dtype(q2.dtype))
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
    if not torch.is_grad_enabled() and (grad is None or grad.numel() != q.numel()):
        # A second backward (retain_graph), or no gradient from the forward: the kernel again.
        _, grad = torch.ops.fastvat.kl_div_with_logits(p, q.detach(), mask, True)
    if torch.is_grad_enabled():
        # Double backward (create_graph=True): recompute differentiably.
        dt = ref.acc_dtype(q.dtype)
        g = torch.softmax(q.to(dt), -1) - torch.softmax(p.detach().to(dt), -1)
        if mask is not None:
            g = g * mask.to(dt).unsqueeze(-1)
        return None, (g * grad_rows.to(dt).unsqueeze(-1)).to(q.dtype), None, None
    scale = grad_rows.unsqueeze(-1).to(grad.dtype)
    if type(grad) is torch.Tensor and torch._C._len_torch_dispatch_stack() == 0:
        return None, grad.mul_(scale), None, None  # eager: reuse the forward's buffer
    return None, grad * scale, None, None  # traced (fake/functional tensors): no mutation


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
