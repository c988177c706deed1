"""The fused ops: validated wrappers over torch.ops.fastvat.*, their fake kernels and autograd.

Every op has a pure-PyTorch twin in fastvat.reference; when the compiled kernels are missing
(or not built for a tensor's device) the wrapper runs the reference instead, with the same
validation and the same results.
"""
from __future__ import annotations

import torch

from fastvat import _checks, _extension
from fastvat import reference as ref

NORMS = ref.NORMS
REDUCTIONS = ref.REDUCTIONS

BACKEND = _extension.load()
_HAVE_OPS = BACKEND != "reference"


def _use_kernel(t: torch.Tensor) -> bool:
    if not _HAVE_OPS:
        return False
    if t.device.type == "cpu":
        return True
    if t.device.type == "cuda":
        return _extension._STATE["cuda"]
    return t.device.type == "meta"


# ---------------------------------------------------------------------------------------------
# l2_normalize
# ---------------------------------------------------------------------------------------------
def l2_normalize(x, *, scale=1.0, norm="global", mask=None, baseline=None):
    """``scale * v / ||v||`` with ``v = (x - baseline) * mask``, one L2 norm per group.

    norm: ``"global"`` one norm over the whole tensor; ``"sample"`` one per index of dim 0;
    ``"token"`` one per vector along the last dim. mask: bool or 0/1 over leading dims of x
    (e.g. ``[B, T]`` for ``[B, T, H]``); masked positions are zero and stay out of the norm.
    baseline: optional tensor of x's shape; fuses the finite-difference form ``x - baseline``.
    A group whose norm is zero gives zeros (never NaN). Differentiable in x and baseline.
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
    if mask is not None:
        mask = _checks.leading_mask(mask, x)
    if not _use_kernel(x):
        return ref.l2_normalize(x, scale=scale, norm=norm, mask=mask, baseline=baseline)
    if baseline is not None and baseline.dtype != x.dtype:
        baseline = baseline.to(x.dtype)
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


# ---------------------------------------------------------------------------------------------
# perturb_ / restore_
# ---------------------------------------------------------------------------------------------
def perturb_(weight, direction, *, scale, previous=None, out=None):
    """The article's in-place step on an embedding matrix.

    ``new = scale * direction / ||direction||`` (global norm), ``weight += new - previous``,
    returns ``new``. ``new`` is written over ``previous`` when it is given (so the loop reuses
    one buffer), else into ``out``, else into a fresh tensor. ``restore_(weight, new)`` undoes it.
    direction may be the very same memory as weight, previous or out (it is read in full first),
    and out the same as previous; any other sharing of memory between the arguments (views of one
    buffer that partly overlap, or previous/out being weight) is a ValueError.
    """
    _checks.tensor("weight", weight, floating=True)
    _checks.tensor("direction", direction, floating=True)
    scale = _checks.finite_number("scale", scale)
    _checks.same_device("direction", direction, "weight", weight)
    _checks.same_shape("direction", direction, "weight", weight)
    for name, buf in (("previous", previous), ("out", out)):
        if buf is not None:
            _checks.tensor(name, buf, floating=True)
            _checks.same_device(name, buf, "weight", weight)
            _checks.same_shape(name, buf, "weight", weight)
            if buf.dtype != weight.dtype:
                raise TypeError(f"{name} must have weight's dtype {weight.dtype}, got {buf.dtype}")
    _checks.not_grad_leaf("weight", weight)
    _check_perturb_overlap(weight=weight, direction=direction, previous=previous, out=out)
    if not _use_kernel(weight):
        return ref.perturb_(weight, direction, scale, previous=previous, out=out)
    if previous is not None and out is not None and out is not previous:
        if _checks.memory_overlap(out, direction) != "none":
            direction = direction.clone()  # out receives previous before the kernel reads direction
        out.copy_(previous)
        delta = out
    elif previous is not None:
        delta = previous
    elif out is not None:
        delta = out
    else:
        delta = torch.empty_like(weight)
    if not delta.is_contiguous() or not weight.is_contiguous():
        # The kernel works on contiguous memory; write back through the views afterwards.
        w_c, d_c = weight.contiguous(), delta.contiguous()
        torch.ops.fastvat.perturb_(w_c, direction, d_c, scale, previous is not None)
        if w_c.data_ptr() != weight.data_ptr():
            weight.copy_(w_c)
        if d_c.data_ptr() != delta.data_ptr():
            delta.copy_(d_c)
        return delta
    torch.ops.fastvat.perturb_(weight, direction, delta, scale, previous is not None)
    return delta


# The pairs of perturb_'s arguments that may be one and the same memory. Every element is read
# before it is written, so direction may be anything; previous and out are then one buffer.
_SAME_MEMORY_ALLOWED = {("weight", "direction"), ("direction", "previous"), ("direction", "out"), ("previous", "out")}


def _check_perturb_overlap(**tensors):
    """Raise if two arguments share memory other than as allowed above: with partly overlapping
    views the result would depend on the order in which the kernel's threads write."""
    named = [(name, t) for name, t in tensors.items() if t is not None]
    for i, (a_name, a) in enumerate(named):
        for b_name, b in named[i + 1:]:
            how = _checks.memory_overlap(a, b)
            if how == "none" or (how == "same" and (a_name, b_name) in _SAME_MEMORY_ALLOWED):
                continue
            if how == "same":
                raise ValueError(
                    f"{a_name} and {b_name} are the same memory; {b_name} must be a separate buffer "
                    f"(it receives or holds the perturbation, which is added to {a_name})"
                )
            raise ValueError(
                f"{a_name} and {b_name} partially overlap (views of one buffer that share some elements); "
                "pass separate tensors, or the very same one where aliasing is allowed"
            )


def restore_(weight, previous):
    """Undo ``perturb_``: ``weight -= previous`` (exact up to one rounding; see docs/numerics)."""
    _checks.tensor("weight", weight, floating=True)
    _checks.tensor("previous", previous, floating=True)
    _checks.same_device("previous", previous, "weight", weight)
    _checks.same_shape("previous", previous, "weight", weight)
    _checks.not_grad_leaf("weight", weight)
    return ref.restore_(weight, previous)


# ---------------------------------------------------------------------------------------------
# kl_div_with_logits
# ---------------------------------------------------------------------------------------------
def kl_div_with_logits(p_logits, q_logits, *, mask=None, reduction="batchmean"):
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
        mask = _row_mask(mask, q_logits)
    batch = q_logits.shape[0] if q_logits.dim() > 1 else 1
    if not _use_kernel(q_logits):
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


def _row_mask(mask, q_logits):
    """The mask validated and expanded to every leading dim of the logits: a mask over the first k
    of them covers, for each of its entries, all the rows below it."""
    _checks.tensor("mask", mask)
    lead = tuple(q_logits.shape[:-1])
    if mask.dim() > len(lead):
        raise ValueError(f"mask has {mask.dim()} dims but the logits have {len(lead)} leading (non-class) dims")
    probe = torch.empty(lead + (1,), device=q_logits.device, dtype=q_logits.dtype)
    mask = _checks.leading_mask(mask, probe, x_name="the logits' leading dims")
    return mask.reshape(tuple(mask.shape) + (1,) * (len(lead) - mask.dim())).expand(lead)


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


# ---------------------------------------------------------------------------------------------
# embedding_gather_add
# ---------------------------------------------------------------------------------------------
def embedding_gather_add(weight, ids, delta, delta_index, *, padding_idx=None):
    """``weight[ids] + delta[delta_index]``: the out-of-place weight-target perturbation.

    delta holds perturbation rows for the active vocabulary rows only ([U, H]); delta_index
    (ids' shape) says which delta row each token uses. Backward gives weight a dense gradient
    as ``F.embedding`` does (zero for ``padding_idx``) and delta a per-row segment sum.
    """
    _checks.tensor("weight", weight, floating=True)
    _checks.tensor("ids", ids, integer=True)
    _checks.tensor("delta", delta, floating=True)
    _checks.tensor("delta_index", delta_index, integer=True)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [num_embeddings, dim], got shape {tuple(weight.shape)}")
    if delta.dim() != 2 or delta.shape[1] != weight.shape[1]:
        raise ValueError(
            f"delta must be 2-D [rows, {weight.shape[1]}] to match weight, got shape {tuple(delta.shape)}"
        )
    for name, t in (("ids", ids), ("delta", delta), ("delta_index", delta_index)):
        _checks.same_device(name, t, "weight", weight)
    _checks.same_shape("delta_index", delta_index, "ids", ids)
    if delta.dtype != weight.dtype:
        raise TypeError(f"delta must have weight's dtype {weight.dtype}, got {delta.dtype}")
    # Index ranges: checked on the CPU in eager mode. On a GPU a check would cost a host sync (the
    # kernel asserts instead), and under torch.compile it would be a data-dependent graph break.
    if weight.device.type == "cpu" and not torch.compiler.is_compiling():
        _checks.index_range("ids", ids, weight.shape[0], "the rows of weight")
        _checks.index_range("delta_index", delta_index, delta.shape[0], "the rows of delta")
    if padding_idx is None:
        padding_idx = -1
    elif padding_idx < 0:
        padding_idx += weight.shape[0]
    if not _use_kernel(weight):
        return ref.embedding_gather_add(weight, ids, delta, delta_index, padding_idx)
    return torch.ops.fastvat.embedding_gather_add(weight, ids, delta, delta_index, padding_idx)


def _gather_setup(ctx, inputs, output):
    weight, ids, delta, delta_index, padding_idx = inputs
    ctx.padding_idx = padding_idx
    ctx.num_weight_rows = weight.shape[0]
    ctx.num_delta_rows = delta.shape[0]
    ctx.save_for_backward(ids, delta_index)


def _gather_backward(ctx, grad):
    ids, delta_index = ctx.saved_tensors
    need_w, _, need_d, _, _ = ctx.needs_input_grad
    gw, gd = torch.ops.fastvat.embedding_gather_add_backward(
        grad.contiguous(), ids, delta_index, ctx.num_weight_rows, ctx.num_delta_rows, ctx.padding_idx, need_w, need_d
    )
    return (gw if need_w else None), None, (gd if need_d else None), None, None


# ---------------------------------------------------------------------------------------------
# fake kernels and autograd registration
# ---------------------------------------------------------------------------------------------
if _HAVE_OPS:

    @torch.library.register_fake("fastvat::l2_normalize")
    def _l2_fake(x, baseline, mask, scale, norm):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("fastvat::perturb_")
    def _perturb_fake(weight, direction, delta, scale, has_previous):
        return None

    @torch.library.register_fake("fastvat::kl_div_with_logits")
    def _kl_fake(p, q, mask, compute_grad):
        rows = q.new_empty(q.shape[:-1], dtype=ref.acc_dtype(q.dtype))
        grad = torch.empty_like(q, memory_format=torch.contiguous_format) if compute_grad else q.new_empty((0,))
        return rows, grad

    @torch.library.register_fake("fastvat::embedding_gather_add")
    def _gather_fake(weight, ids, delta, delta_index, padding_idx):
        return weight.new_empty(tuple(ids.shape) + (weight.shape[1],))

    @torch.library.register_fake("fastvat::embedding_gather_add_backward")
    def _gather_backward_fake(grad, ids, delta_index, num_weight_rows, num_delta_rows, padding_idx, need_w, need_d):
        h = grad.shape[-1]
        gw = grad.new_empty((num_weight_rows, h) if need_w else (0,))
        gd = grad.new_empty((num_delta_rows, h) if need_d else (0,))
        return gw, gd

    torch.library.register_autograd("fastvat::l2_normalize", _l2_backward, setup_context=_l2_setup)
    torch.library.register_autograd("fastvat::kl_div_with_logits", _kl_backward, setup_context=_kl_setup)
    torch.library.register_autograd(
        "fastvat::embedding_gather_add", _gather_backward, setup_context=_gather_setup
    )
