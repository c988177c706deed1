"""Language-model heads without logits: a regularizer given ``head=`` takes the head's input.

A causal LM's vocabulary head turns [B, T, H] hidden states into [B, T, V] logits, and at V = 128k
those logits, not the transformer, dominate a VAT step's memory. With ``head=`` a regularizer lets the
model run up to its head, keeps the head's input (the final hidden states) and hands back a stand-in
for the logits that costs no memory (one zero broadcast to the logits' shape, which nothing reads);
the divergence is then ``fastvat.ops.linear_kl_div``, which walks the tokens in chunks and never builds
the logits either.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastvat import _fsdp
from fastvat import reference as ref
from fastvat.ops.kl import kl_div_with_logits
from fastvat.ops.linear_kl import default_chunk_size

IGNORE_INDEX = -100  # the label of positions that are not trained (prompt, padding), as in Hugging Face


class HeadCapture:
    """The head of ``model`` (an ``nn.Linear``: weight [V, H], optional bias), run as a capture."""

    def __init__(self, model: nn.Module, head):
        if not isinstance(head, nn.Linear):
            raise TypeError(
                f"head must be the model's output projection as an nn.Linear (e.g. model.get_output_embeddings()), "
                f"got {type(head).__name__}"
            )
        if not any(m is head for m in model.modules()):
            raise ValueError("head must be a submodule of model (the model's own output projection)")
        cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
        if cap:
            # the model reshapes the head's output (cap * tanh(logits / cap)); the fused KL of the raw
            # head outputs would be another divergence
            raise ValueError(
                f"head= cannot be used with a model that soft-caps its logits (config.final_logit_softcapping={cap}); "
                "call the regularizer without head= (the logits are then built)"
            )
        self.module = head
        self.hidden = None

    @property
    def weight(self):
        return self.module.weight

    @property
    def bias(self):
        return self.module.bias

    def _forward(self, h):
        if self.hidden is not None:
            raise RuntimeError(
                "the head was called twice in one forward pass; fastvat takes one set of hidden states per pass"
            )
        self.hidden = h
        # the logits' shape and dtype at no memory cost: nothing downstream is meant to read them
        return h.new_zeros(()).expand(*h.shape[:-1], self.module.out_features)

    @contextlib.contextmanager
    def capturing(self):
        """For one pass: the head records its input instead of computing logits."""
        m = self.module
        if "forward" in m.__dict__:
            raise RuntimeError(
                "the head's forward is already patched on the instance (by another fastvat call or by user "
                "code); fastvat cannot take its input"
            )
        self.hidden = None
        m.forward = self._forward
        try:
            yield self
        finally:
            del m.forward

    def take(self):
        """The hidden states captured by the last pass."""
        h, self.hidden = self.hidden, None
        if h is None:
            raise ValueError(
                "the model's forward never called the head passed as head=; pass the module that maps the final "
                "hidden states to the vocabulary (model.get_output_embeddings())"
            )
        if not h.is_floating_point():
            raise TypeError(f"the head's input must be floating-point hidden states, got {h.dtype}")
        # The divergence multiplies by the head's weight after the model's forward has returned. A head that
        # FSDP2 shards as a unit of its own is resharded right after its forward, and its gradient would then
        # reach no unsharded parameter for FSDP to reduce; the root unit keeps its parameters whole until
        # backward, and so does a unit with reshard_after_forward=False.
        if any(_fsdp.is_dtensor(t) for t in (self.module.weight, self.module.bias) if t is not None):
            raise NotImplementedError(
                "head= needs the head's parameters whole after the model's forward, but FSDP has resharded them: "
                "the head is a fully_shard unit of its own with reshard_after_forward=True. Leave the head in the "
                "root unit (shard only the decoder layers), or fully_shard it with reshard_after_forward=False"
            )
        return h


def trained_positions(labels, shape):
    """A [B, T] mask of the positions whose prediction is trained: the logits at t predict token t + 1
    (a causal LM's shifted labels), so position t counts when labels[t + 1] is not IGNORE_INDEX; the last
    position predicts nothing. None when labels are not a [B, T] tensor matching ``shape``."""
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(shape):
        return None
    keep = torch.zeros(shape, dtype=torch.bool, device=labels.device)
    keep[..., :-1] = labels[..., 1:] != IGNORE_INDEX
    return keep


def _reverse_kl_rows(p_logits, q_logits, keep):
    """Per row KL(softmax(q) || softmax(p)) in the accumulation dtype; rows where ``keep`` is 0 give 0.

    The KL op with its arguments swapped (its gradient w.r.t. the first argument), so that this half
    keeps the op's accuracy for nearby distributions, where the plain formula's rounding is as large
    as the KL itself and can make it negative."""
    return kl_div_with_logits(q_logits, p_logits, mask=keep, reduction="none")


def _reverse_kl_head_rows(h_p, h_q, weight, bias, keep):
    # p is a constant: its logits give the head no gradient
    with torch.no_grad():
        p_logits = F.linear(h_p, weight, bias)
    return _reverse_kl_rows(p_logits, F.linear(h_q, weight, bias), keep)


def reverse_kl(p, q, mask, reduction, head=None):
    """KL(softmax(q) || softmax(p)) with p constant: the other half of a symmetric KL (R3F's).

    ``p``, ``q``: logits, or with ``head`` (an ``nn.Linear``) the hidden states it maps to logits. The
    head's logits are formed a chunk of tokens at a time under activation checkpointing, so that, as
    with ``ops.linear_kl_div``, no [N, V] tensor outlives its chunk; backward recomputes each chunk.
    """
    lead = tuple(q.shape[:-1])
    keep = torch.ones(lead, device=q.device) if mask is None else mask.to(q.device).expand(lead)
    batch = q.shape[0] if q.dim() > 1 else 1
    p = p.detach()
    if head is None:
        rows = _reverse_kl_rows(p, q, keep)
    else:
        n, hdim = math.prod(lead), q.shape[-1]
        hp, hq, kf = p.reshape(n, hdim), q.reshape(n, hdim), keep.reshape(n)
        step = default_chunk_size(head.out_features)
        parts = [
            checkpoint(_reverse_kl_head_rows, hp[i:i + step], hq[i:i + step], head.weight, head.bias, kf[i:i + step],
                       use_reentrant=False)
            for i in range(0, n, step)
        ]
        rows = (torch.cat(parts) if parts else hq.new_zeros((0,), dtype=ref.acc_dtype(hq.dtype))).reshape(lead)
    return ref.reduce_rows(rows, reduction, batch, None if mask is None else keep)
