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


# What a model's forward does to its head's output before the loss, read from its config. Attribute ->
# {model_type: kind}; "*" stands for any model type. Found by reading transformers' causal-LM (and
# multimodal ForConditionalGeneration) forward methods; docs/integrations.md has the table by family.
# A scale is linear and is folded into the fused KL exactly; a soft cap is not linear and is refused;
# "none": the model has the attribute but does not apply it to the head's output.
MULTIPLY, DIVIDE, SOFTCAP, NONE = "multiply", "divide", "softcap", "none"
VOCAB_SLICE, STREAMS = "vocabulary slice", "n-gram streams"
_GRANITE = ("granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared",
            "granite4_vision", "granite_docling")
_COHERE = ("cohere", "cohere2", "cohere2_moe", "cohere_compass", "cohere_compass_text", "aya_vision")
LOGIT_TRANSFORMS = {
    "final_logit_softcapping": {"*": SOFTCAP},  # Gemma 2/3/3n/4, VaultGemma, NanoChat, PaliGemma, ...
    "logits_soft_cap": {"*": SOFTCAP},  # RecurrentGemma
    "output_logit_soft_cap": {"*": SOFTCAP},  # xLSTM
    "logits_scaling": {**dict.fromkeys(_GRANITE, DIVIDE), "hyperclovax": MULTIPLY, "hyperclovax_vision_v2": MULTIPLY,
                       "minicpm3": NONE},  # MiniCPM3 divides the head's input, which the capture already holds
    "logit_scale": {**dict.fromkeys(_COHERE, MULTIPLY), "cohere2_vision": NONE, "mpt": NONE},
    "lm_head_multiplier": {"falcon_h1": MULTIPLY},
    "output_multiplier": {"muse_spark": MULTIPLY, "muse_glimmer": MULTIPLY},
    "unpadded_vocab_size": {"*": VOCAB_SLICE},  # Inkling keeps the first n columns of the logits
    # ProphetNet runs its head on n streams and keeps the first as the logits
    "ngram": {"prophetnet": STREAMS, "*": NONE},
}


def _forward_owner(cls):
    """The class in ``cls``' MRO that defines ``forward`` (FSDP2's wrapper classes define none)."""
    return next((c for c in cls.__mro__ if "forward" in c.__dict__), None)


def _owner(model, head):
    """The module whose forward calls ``head`` and applies its config's transforms: the nearest module
    above the head that carries a config (a multimodal wrapper's language model, say), else ``model``."""
    parents = {}
    for m in model.modules():
        for c in m.children():
            parents.setdefault(id(c), m)
    m = parents.get(id(head))
    while m is not None and getattr(m, "config", None) is None:
        m = parents.get(id(m))
    return model if m is None else m


def _config_value(config, attr):
    """``config.attr``, else the text config's (a multimodal config keeps the language model's there)."""
    value = getattr(config, attr, None)
    if value is not None:
        return value
    get_text = getattr(config, "get_text_config", None)
    text = get_text() if callable(get_text) else None
    return None if text is None or text is config else getattr(text, attr, None)


def logit_scale(owner, vocab_size) -> float:
    """The factor the owner's forward multiplies the head's output by (1.0: none); raises for a transform
    that is not a scale, or one whose use by this model type is unknown."""
    config = getattr(owner, "config", None)
    if config is None:
        return 1.0
    model_type = str(getattr(config, "model_type", None))
    scale = 1.0
    for attr, kinds in LOGIT_TRANSFORMS.items():
        value = _config_value(config, attr)
        if value is None or value is False:
            continue
        kind = kinds.get(model_type, kinds.get("*"))
        if kind == NONE:
            continue
        if kind in (MULTIPLY, DIVIDE):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value == 0:
                raise ValueError(f"config.{attr}={value!r} must be a finite nonzero number to scale the logits")
            scale *= value if kind == MULTIPLY else 1.0 / value
            continue
        if kind == SOFTCAP:
            if not value:
                continue
            # the model reshapes the head's output (cap * tanh(logits / cap)); the fused KL of the raw
            # head outputs would be another divergence
            raise ValueError(
                f"head= cannot be used with a model that soft-caps its logits (config.{attr}={value}); "
                "call the regularizer without head= (the logits are then built)"
            )
        if kind in (VOCAB_SLICE, STREAMS):
            if kind == VOCAB_SLICE and isinstance(value, int) and value >= vocab_size:
                continue  # keeps every column
            if kind == STREAMS and value == 1:
                continue  # one stream: the logits are the head's output
            raise ValueError(
                f"head= cannot be used with a model whose forward changes the head's output ({kind}: "
                f"config.{attr}={value}); call the regularizer without head= (the logits are then built)"
            )
        if isinstance(value, (int, float)) and value == 1:
            continue  # an unknown model with the identity value: nothing to apply either way
        raise ValueError(
            f"head= cannot tell how {type(owner).__name__} (model_type {model_type!r}) applies config.{attr}={value!r} "
            "to its logits, and the fused KL would be that of the head's raw outputs; call the regularizer without "
            "head= (the logits are then built)"
        )
    return scale


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
        if _forward_owner(type(head)) is not nn.Linear:
            # a subclass that reshapes its output (a learned per-token logit scale, a quantised matmul)
            # is not h W^T + b, the function the fused KL computes
            raise TypeError(
                f"head must compute plain h @ weight.T + bias, but {type(head).__name__} overrides nn.Linear.forward; "
                "call the regularizer without head= (the logits are then built)"
            )
        owner = _owner(model, head)
        self.scale = logit_scale(owner, head.out_features)
        self.owner = owner
        self.module = head
        self._final_logits_bias()  # a dtype it cannot take is refused now, not after the passes
        self.hidden = None

    @property
    def weight(self):
        return self.module.weight

    @property
    def bias(self):
        """The bias of the logits the model forms: the head's, plus the owner's final_logits_bias, times the scale."""
        b, extra = self.module.bias, self._final_logits_bias()
        if extra is not None:
            b = extra if b is None else b + extra
        return b if b is None or self.scale == 1 else b * self.scale

    def _final_logits_bias(self):
        """The [1, V] buffer a BART-family encoder-decoder adds to its head's output, as a [V] bias in
        the head's dtype (the fused op's), or None. Looked up at each use: model.to() replaces buffers."""
        extra, w = getattr(self.owner, "final_logits_bias", None), self.module.weight
        if not isinstance(extra, torch.Tensor) or extra.numel() != w.shape[0]:
            return None
        extra = extra.detach().reshape(-1)
        if torch.promote_types(extra.dtype, w.dtype) != w.dtype:
            # the model adds it in its own, wider dtype; rounding it to the head's would be another bias
            raise TypeError(
                f"head= needs the model's final_logits_bias in the head's dtype or narrower, got {extra.dtype} for a "
                f"{w.dtype} head; cast the whole model (model.to(dtype)) or call the regularizer without head="
            )
        return extra.to(device=w.device, dtype=w.dtype)

    @property
    def out_features(self):
        return self.module.out_features

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
        if self.scale != 1:
            # s (h W^T + b) = (s h) W^T + s b: the scale goes on the [N, H] states (and the bias), not on
            # the [V, H] weight, which would be copied; autograd carries s into every gradient
            h = h * self.scale
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


def label_shift(model, head) -> int | None:
    """How a call's ``labels`` line up with the logits' positions, or None where they are not positions.

    1: a causal LM, whose loss scores the logits at t against labels[t + 1] (any model given ``head=``,
    and a decoder-only model that can generate); 0: an encoder-decoder model, whose loss scores the
    decoder's logits at t against labels[t]; None: any other model (sequence or token classification,
    a plain module): its labels are class ids for the supervised loss and say nothing here.
    """
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) is True:
        return 0
    if head is not None:
        return 1
    can_generate = getattr(model, "can_generate", None)  # transformers' models: True for causal LMs
    return 1 if callable(can_generate) and can_generate() is True else None


def trained_positions(labels, shape, shift):
    """A mask over the logits' positions ``shape`` ([B, T]): those whose prediction the model's own loss
    trains. With ``shift`` 1 the logits at t predict token t + 1, so t counts where labels[t + 1] is
    not IGNORE_INDEX and the last position never counts; with ``shift`` 0, where labels[t] is not."""
    shape = tuple(shape)
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != shape:
        got = f"shape {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(
            f"labels must be a tensor of shape {shape}, one label per position of the logits (the model's own "
            f"unshifted labels, {IGNORE_INDEX} where a position is not trained), got {got}"
        )
    if shift == 0:
        return labels != IGNORE_INDEX
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

    ``p``, ``q``: logits, or with ``head`` (a ``HeadCapture``) the hidden states it maps to logits. The
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
