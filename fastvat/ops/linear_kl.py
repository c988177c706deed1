"""``linear_kl_div``: KL between the softmaxes of two outputs of one linear head (an LM head), chunked
over tokens so that the [N, V] logits never exist, the gradients formed during the forward sweep.

The op is a ``torch.library.custom_op`` rather than an ``autograd.Function``: a custom op is one opaque
node for torch.compile (its fake kernel gives the output shapes, so dynamo neither breaks the graph nor
traces the Python chunk loop, whose per-chunk buffers would otherwise be unrolled into the graph), and
its autograd is registered the same way as the other fastvat ops. The loop itself calls the fused KL
kernel (``torch.ops.fastvat.kl_div_with_logits``) per chunk, or the reference KL without kernels.
"""
from __future__ import annotations

import numbers

import torch

from fastvat import _checks, _torch_internals
from fastvat import reference as ref
from fastvat.ops._backend import use_kernel
from fastvat.ops.kl import REDUCTIONS

# Elements of one [chunk, V] slab of logits: 2^23 floats is 32 MiB in float32, small enough for the
# working set of one chunk (p, q and their gradient) to stay a few tens of MB whatever the vocabulary,
# large enough that the matmuls of a chunk stay efficient.
CHUNK_ELEMENTS = 1 << 23


def default_chunk_size(vocab_size: int) -> int:
    """The largest power of two c with c * vocab_size <= 2^23 (at least 1): 64 rows for V = 128,256,
    256 for V = 32,000."""
    c = max(1, CHUNK_ELEMENTS // max(int(vocab_size), 1))
    return 1 << (c.bit_length() - 1)


def linear_kl_div(h_p: torch.Tensor, h_q: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  mask: torch.Tensor | None = None, reduction: str = "batchmean",
                  chunk_size: int | None = None) -> torch.Tensor:
    """Per token KL(softmax(h_p W^T + b) || softmax(h_q W^T + b)), without materialising the logits.

    The tokens are walked in chunks of ``chunk_size`` rows; for each chunk the two [chunk, V] logit slabs
    are formed in h's dtype (for bfloat16/float16 the matmul runs in that dtype, as the model's head
    would), the KL rows and their gradient softmax(q) - softmax(p) come from one pass of the fused KL
    kernel (accumulating in float32 for 16-bit inputs), and the gradients for h_q, weight and bias are
    accumulated right away (weight's and bias' in float32 for 16-bit parameters, cast at the end). For
    the reductions to a scalar, backward only scales these gradients by the upstream gradient. With
    ``reduction="none"`` every row has its own upstream gradient, unknown during the forward: the forward
    then only computes the rows and backward recomputes the logits chunk by chunk (one more sweep).
    Under ``torch.no_grad`` or when no argument requires grad, no gradient work is done.

    Args:
        h_p: clean hidden states [..., H]: a constant (never receives a gradient).
        h_q: perturbed hidden states, h_p's shape and dtype; differentiable.
        weight: the head's weight [V, H] (as ``nn.Linear``), h_q's dtype and device; differentiable.
        bias: optional head bias [V], weight's dtype; differentiable.
        mask: bool or 0/1 numbers over h's leading dims, or over the first few of them (a ``[B]`` mask
            on ``[B, T, H]`` masks whole samples). A masked row counts exactly 0 and gets a zero gradient,
            even when its hidden states are NaN or inf (padding): it is computed on zeros. Other values
            weight their row as in ``kl_div_with_logits``.
        reduction: ``"batchmean"`` (sum / size of h's dim 0; a 1-D h is one token, batch 1), ``"mean"``
            (sum / number of unmasked rows), ``"sum"`` or ``"none"`` (one value per row, ``h.shape[:-1]``).
        chunk_size: rows per chunk; default :func:`default_chunk_size` (V), so that one [chunk, V]
            slab holds about 2^23 elements.

    Returns:
        The loss: a 0-dim tensor, or ``h.shape[:-1]`` for ``"none"``; float32 for 16-bit inputs
        (float64 for float64), like ``kl_div_with_logits``.

    Raises:
        TypeError: a non-floating-point tensor, or mismatched dtypes.
        ValueError: mismatched shapes or devices, an unknown reduction, a bad chunk_size, or a mask
            that does not cover h's leading dims.
    """
    _checks.tensor("h_p", h_p, floating=True)
    _checks.tensor("h_q", h_q, floating=True)
    _checks.tensor("weight", weight, floating=True)
    if bias is not None:
        _checks.tensor("bias", bias, floating=True)
    _checks.choice("reduction", reduction, REDUCTIONS)
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
            raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if h_q.dim() == 0:
        raise ValueError("h_q must have a hidden dim (at least 1-D), got a 0-dim tensor")
    _checks.same_shape("h_p", h_p, "h_q", h_q)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [vocab_size, hidden], got shape {tuple(weight.shape)}")
    hidden = h_q.shape[-1]
    vocab = weight.shape[0]
    if weight.shape[1] != hidden:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)} but h_q's last (hidden) dim is {hidden}; weight must be [V, {hidden}]"
        )
    if vocab == 0:
        raise ValueError(f"weight has no rows: shape {tuple(weight.shape)} gives logits with no classes")
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"bias must have shape ({vocab},) to match weight's rows, got {tuple(bias.shape)}")
    for name, t in (("h_p", h_p), ("weight", weight), ("bias", bias)):
        if t is not None:
            _checks.same_device(name, t, "h_q", h_q)
    for name, t in (("h_p", h_p), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != h_q.dtype:
            raise TypeError(f"{name} must have h_q's dtype {h_q.dtype}, got {t.dtype}")
    lead = tuple(h_q.shape[:-1])
    if mask is not None:
        mask = _checks.row_mask(mask, h_q, x_name="h_q", feature="hidden")
    batch = lead[0] if lead else 1
    chunk = int(chunk_size) if chunk_size is not None else default_chunk_size(vocab)

    hp2 = h_p.detach().reshape(-1, hidden)
    hq2 = h_q.reshape(-1, hidden)
    mask_flat = None if mask is None else mask.reshape(-1).to(ref.acc_dtype(h_q.dtype))
    reduce = reduction != "none"
    grad_on = torch.is_grad_enabled() and reduce
    out, _, _, _ = torch.ops.fastvat.linear_kl_div(
        hp2, hq2, weight, bias, mask_flat, chunk, reduce,
        grad_on and h_q.requires_grad, grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    if not reduce:
        return out.reshape(lead)
    if reduction == "sum":
        return out
    if reduction == "batchmean":
        return out / max(batch, 1)
    count = mask_flat.sum() if mask_flat is not None else torch.tensor(float(hq2.shape[0]), dtype=out.dtype)
    return out / count.clamp_min(1)


def _kl_chunk(p, q, mask, compute_grad):
    """(rows, d rows / d q) of one chunk of logits: the fused kernel, or the reference without it."""
    if use_kernel(q):
        rows, grad = torch.ops.fastvat.kl_div_with_logits(p, q, mask, compute_grad)
        return rows, (grad if compute_grad else None)
    rows = ref.kl_rows(p, q, mask)
    if not compute_grad:
        return rows, None
    _, grad = ref.kl_grads(p, q, mask, want_p=False)
    return rows, grad.to(q.dtype)


def _widen_weight_grad(device: torch.device) -> bool:
    """Whether a 16-bit weight gradient is formed from float32 copies of each chunk's operands (CPU)
    rather than as a 16-bit product added to the float32 sum (GPU); see _sweep."""
    return device.type == "cpu"


def _sweep(h_p, h_q, weight, bias, mask, chunk, grad_rows, need_h_q, need_weight, need_bias):
    """One pass over the tokens: (KL per row, grad_h_q, grad_weight, grad_bias) of sum(grad_rows * rows)
    (of the plain sum without grad_rows); unwanted gradients are empty tensors."""
    n, hidden = h_q.shape
    vocab = weight.shape[0]
    dt = h_q.dtype
    acc = ref.acc_dtype(dt)
    dev = h_q.device
    need_any = need_h_q or need_weight or need_bias
    rows = torch.empty(n, dtype=acc, device=dev)
    g_hq = torch.empty(n, hidden, dtype=dt, device=dev) if need_h_q else h_q.new_empty((0,))
    # The weight and bias gradients are written by the first chunk and accumulated by the others
    # (zero-filling a [V, H] buffer first would be one more pass over it); no chunk, no write: zeros.
    alloc = torch.zeros if n == 0 else torch.empty
    g_w = alloc(vocab, hidden, dtype=acc, device=dev) if need_weight else None
    g_b = alloc(vocab, dtype=acc, device=dev) if need_bias else None
    c = max(1, min(chunk, n))
    # the logit slabs are reused from chunk to chunk: fresh [c, V] buffers would be paid in page faults
    p_buf = torch.empty(c, vocab, dtype=dt, device=dev)
    q_buf = torch.empty(c, vocab, dtype=dt, device=dev)
    # A 16-bit weight gradient is summed over chunks in float32. On a GPU each chunk's product runs in
    # dt (tensor cores) and is added to the float32 sum by one fused elementwise kernel. On the CPU that
    # mixed-dtype add goes through a slow conversion path, several times the cost of the product itself
    # (benchmarks/RESULTS.md), so the chunk's operands are widened to float32 instead and the product
    # accumulates in place.
    widen = need_weight and dt != acc and _widen_weight_grad(dev)
    w_part = torch.empty(vocab, hidden, dtype=dt, device=dev) if need_weight and dt != acc and not widen else None
    dq_wide = torch.empty(c, vocab, dtype=acc, device=dev) if widen else None
    hq_wide = torch.empty(c, hidden, dtype=acc, device=dev) if widen else None
    w_t = weight.t()
    for s in range(0, n, c):
        e = min(s + c, n)
        first = s == 0
        hp, hq = h_p[s:e], h_q[s:e]
        m = None if mask is None else mask[s:e]
        if m is not None:
            # a masked row's hidden states may be garbage (NaN, inf); zeros keep it out of every sum
            keep = (m != 0).unsqueeze(1)
            hp = torch.where(keep, hp, torch.zeros((), dtype=dt, device=dev))
            hq = torch.where(keep, hq, torch.zeros((), dtype=dt, device=dev))
        p, q = p_buf[: e - s], q_buf[: e - s]
        if bias is None:
            torch.mm(hp, w_t, out=p)
            torch.mm(hq, w_t, out=q)
        else:
            torch.addmm(bias, hp, w_t, out=p)
            torch.addmm(bias, hq, w_t, out=q)
        r, dq = _kl_chunk(p, q, m, need_any)
        rows[s:e] = r
        if not need_any:
            continue
        if grad_rows is not None:
            dq = dq.mul_(grad_rows[s:e].unsqueeze(1))
        if need_h_q:
            torch.mm(dq, weight, out=g_hq[s:e])
        if need_weight:
            # beta=0 ignores the buffer's uninitialised contents, NaN included
            if widen:
                dqw, hqw = dq_wide[: e - s].copy_(dq), hq_wide[: e - s].copy_(hq)
                g_w.addmm_(dqw.t(), hqw, beta=0 if first else 1)
            elif w_part is None:
                g_w.addmm_(dq.t(), hq, beta=0 if first else 1)
            else:
                torch.mm(dq.t(), hq, out=w_part)
                if first:
                    g_w.copy_(w_part)
                else:
                    g_w.add_(w_part)
        if need_bias:
            if first:
                torch.sum(dq, 0, dtype=acc, out=g_b)
            else:
                g_b.add_(dq.sum(0, dtype=acc))
    w_part = dq_wide = None  # freed before the cast allocates the result
    g_w = g_w.to(dt) if need_weight else h_q.new_empty((0,))
    g_b = g_b.to(dt) if need_bias else h_q.new_empty((0,))
    return rows, g_hq, g_w, g_b


def _linear_kl_impl(
    h_p: torch.Tensor, h_q: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    mask: torch.Tensor | None, chunk_size: int, reduce: bool,
    need_h_q: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, grad_h_q, grad_weight, grad_bias): the rows [N] (reduce=False, no gradients) or their sum
    with the gradients of that sum; an unwanted gradient is an empty tensor."""
    rows, g_hq, g_w, g_b = _sweep(
        h_p, h_q, weight, bias, mask, chunk_size, None, need_h_q and reduce, need_weight and reduce, need_bias and reduce
    )
    return (rows.sum() if reduce else rows), g_hq, g_w, g_b


def _linear_kl_backward_impl(
    h_p: torch.Tensor, h_q: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    mask: torch.Tensor | None, grad_rows: torch.Tensor, chunk_size: int,
    need_h_q: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum(grad_rows * rows), recomputed chunk by chunk (grad_rows: [N], any dtype)."""
    grad_rows = grad_rows.to(ref.acc_dtype(h_q.dtype))
    _, g_hq, g_w, g_b = _sweep(h_p, h_q, weight, bias, mask, chunk_size, grad_rows, need_h_q, need_weight, need_bias)
    return g_hq, g_w, g_b


_linear_kl_op = torch.library.custom_op("fastvat::linear_kl_div", _linear_kl_impl, mutates_args=())
_linear_kl_backward_op = torch.library.custom_op(
    "fastvat::linear_kl_div_backward", _linear_kl_backward_impl, mutates_args=()
)


def _grads_fake(h_q, weight, need_h_q, need_weight, need_bias):
    return (
        h_q.new_empty(h_q.shape if need_h_q else (0,)),
        h_q.new_empty(weight.shape if need_weight else (0,)),
        h_q.new_empty((weight.shape[0],) if need_bias else (0,)),
    )


@_linear_kl_op.register_fake
def _linear_kl_fake(h_p, h_q, weight, bias, mask, chunk_size, reduce, need_h_q, need_weight, need_bias):
    torch._check(h_q.dim() == 2, lambda: "h_q must be 2-D [N, H]")
    torch._check(h_p.shape == h_q.shape, lambda: "h_p must have h_q's shape")
    torch._check(weight.dim() == 2 and weight.shape[1] == h_q.shape[1], lambda: "weight must be [V, H]")
    acc = ref.acc_dtype(h_q.dtype)
    out = h_q.new_empty(() if reduce else (h_q.shape[0],), dtype=acc)
    return (out,) + _grads_fake(h_q, weight, need_h_q and reduce, need_weight and reduce, need_bias and reduce)


@_linear_kl_backward_op.register_fake
def _linear_kl_backward_fake(h_p, h_q, weight, bias, mask, grad_rows, chunk_size, need_h_q, need_weight, need_bias):
    torch._check(grad_rows.dim() == 1 and grad_rows.shape[0] == h_q.shape[0], lambda: "grad_rows must be [N]")
    return _grads_fake(h_q, weight, need_h_q, need_weight, need_bias)


def _setup(ctx, inputs, output):
    h_p, h_q, weight, bias, mask, chunk_size, reduce, _, _, _ = inputs
    out, g_hq, g_w, g_b = output
    ctx.save_for_backward(h_p, h_q, weight, bias, mask)
    ctx.chunk_size = chunk_size
    ctx.reduce = reduce
    # The forward's gradients are buffers for backward, not differentiable results. They are kept on
    # ctx (not saved) so that backward can scale them in place, allocated once; being non-differentiable
    # they have no grad_fn, so ctx -> gradient makes no reference cycle.
    ctx.mark_non_differentiable(g_hq, g_w, g_b)
    ctx.grads = (g_hq, g_w, g_b)
    # Without this, autograd would hand backward zero tensors for the three unused outputs.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _g_hq, _g_w, _g_b):
    h_p, h_q, weight, bias, mask = ctx.saved_tensors
    _, need_h_q, need_weight, need_bias = ctx.needs_input_grad[:4]
    need_bias = need_bias and bias is not None
    grads, ctx.grads = ctx.grads, None  # used once; a second backward (retain_graph) recomputes
    if grad_out is None:
        return (None,) * 10
    n = h_q.shape[0]
    if torch.is_grad_enabled():
        res = _differentiable_grads(h_p, h_q, weight, bias, mask, grad_out.expand(n) if ctx.reduce else grad_out)
    elif ctx.reduce and grads is not None and _has(grads, need_h_q, need_weight, need_bias):
        if type(grad_out) is torch.Tensor and _torch_internals.dispatch_stack_empty():
            res = tuple(g.mul_(grad_out) if g.numel() else g for g in grads)  # eager: reuse the buffers
        else:
            res = tuple(g * grad_out if g.numel() else g for g in grads)  # traced: no mutation
    elif ctx.reduce:
        # the forward's sums again, then scaled as they would have been: the same bits as the first backward
        ones = torch.ones(n, dtype=grad_out.dtype, device=grad_out.device)
        res = torch.ops.fastvat.linear_kl_div_backward(
            h_p, h_q, weight, bias, mask, ones, ctx.chunk_size, need_h_q, need_weight, need_bias
        )
        res = tuple(g * grad_out if g.numel() else g for g in res)
    else:
        res = torch.ops.fastvat.linear_kl_div_backward(
            h_p, h_q, weight, bias, mask, grad_out, ctx.chunk_size, need_h_q, need_weight, need_bias
        )
    g_hq, g_w, g_b = res
    return (
        None, g_hq if need_h_q else None, g_w if need_weight else None, g_b if need_bias else None,
        None, None, None, None, None, None,
    )


def _has(grads, need_h_q, need_weight, need_bias):
    """Whether the forward formed every gradient backward is asked for."""
    return all(g.numel() > 0 or not need for g, need in zip(grads, (need_h_q, need_weight, need_bias)))


def _differentiable_grads(h_p, h_q, weight, bias, mask, grad_rows):
    """The gradients as differentiable functions of h_q, weight and bias (double backward, with
    create_graph=True): this path materialises the [N, V] logits."""
    dt = ref.acc_dtype(h_q.dtype)
    if mask is not None:
        keep = (mask != 0).unsqueeze(1)
        h_p = torch.where(keep, h_p, torch.zeros_like(h_p))
        h_q = torch.where(keep, h_q, torch.zeros_like(h_q))
    p = torch.nn.functional.linear(h_p.detach(), weight.detach(), None if bias is None else bias.detach())
    q = torch.nn.functional.linear(h_q, weight, bias)
    g = torch.softmax(q.to(dt), -1) - torch.softmax(p.to(dt), -1)
    scale = grad_rows.to(dt) if mask is None else grad_rows.to(dt) * mask.to(dt)
    g = (g * scale.unsqueeze(-1)).to(h_q.dtype)
    return g @ weight, g.t() @ h_q, g.sum(0)


_linear_kl_op.register_autograd(_backward, setup_context=_setup)
