"""``embedding_gather_add``: ``weight[ids] + delta[delta_index]``, the out-of-place weight-target perturbation."""
from __future__ import annotations

import torch

from fastvat import _checks
from fastvat import reference as ref
from fastvat.ops._backend import HAVE_KERNELS, use_kernel


def embedding_gather_add(weight: torch.Tensor, ids: torch.Tensor, delta: torch.Tensor, delta_index: torch.Tensor, *,
                         padding_idx: int | None = None) -> torch.Tensor:
    """``weight[ids] + delta[delta_index]``: the out-of-place weight-target perturbation.

    delta holds perturbation rows for the active vocabulary rows only ([U, H]); delta_index
    (ids' shape) says which delta row each token uses. Backward gives weight a dense gradient
    as ``F.embedding`` does (zero for ``padding_idx``) and delta a per-row segment sum.

    Args:
        weight: the embedding matrix [V, H], floating point.
        ids: int32/int64 token ids, any shape, values in [0, V).
        delta: perturbation rows [U, H], weight's dtype and device.
        delta_index: ids' shape, int32/int64, values in [0, U): the delta row of each token.
        padding_idx: as ``nn.Embedding``'s (no gradient to that row of ``weight``), or None.

    Returns:
        ``ids.shape + [H]``, weight's dtype.

    Raises:
        TypeError: a tensor of the wrong kind or dtype.
        ValueError: mismatched shapes, devices or dtypes, or an index out of range (named).
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
    if not use_kernel(weight):
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


if HAVE_KERNELS:

    @torch.library.register_fake("fastvat::embedding_gather_add")
    def _gather_fake(weight, ids, delta, delta_index, padding_idx):
        torch._check(weight.dim() == 2, lambda: "weight must be 2-D")
        torch._check(delta.dim() == 2 and delta.shape[1] == weight.shape[1], lambda: "delta must be [rows, dim]")
        torch._check(delta_index.shape == ids.shape, lambda: "delta_index must have ids' shape")
        return weight.new_empty(tuple(ids.shape) + (weight.shape[1],))

    @torch.library.register_fake("fastvat::embedding_gather_add_backward")
    def _gather_backward_fake(grad, ids, delta_index, num_weight_rows, num_delta_rows, padding_idx, need_w, need_d):
        torch._check(tuple(grad.shape[:-1]) == tuple(ids.shape), lambda: "grad must be ids' shape + [dim]")
        h = grad.shape[-1]
        gw = grad.new_empty((num_weight_rows, h) if need_w else (0,))
        gd = grad.new_empty((num_delta_rows, h) if need_d else (0,))
        return gw, gd

    torch.library.register_autograd(
        "fastvat::embedding_gather_add", _gather_backward, setup_context=_gather_setup
    )
