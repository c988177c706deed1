"""What every regularizer shares: picking the target, calling the model with r in place,
and leaving the model exactly as it was found."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from fastvat import _checks, _nonfinite, ops
from fastvat._lm_head import HeadCapture, label_shift, trained_positions
from fastvat._model_io import StateGuard, class_last, extract_logits, resolve_embedding, strip_labels
from fastvat._targets import InputTarget, OutputTarget, WeightTarget

TARGETS = ("input", "output", "weight")


class Regularizer:
    """Base class: ``model`` plus where the perturbation goes (``embedding``/``target``/``norm``)."""

    def __init__(self, model, embedding=None, *, norm=None, target=None, generator=None, drop_labels=True,
                 nonfinite="raise", class_dim=None, head=None):
        # what a NaN/Inf does in a call, for every regularizer (fastvat/_nonfinite.py)
        self.nonfinite = _checks.choice("nonfinite", nonfinite, _nonfinite.MODES)
        # the logits' class dim; None: the last, refused for logits of 4+ dims (see _model_io.class_last)
        self.class_dim = _checks.class_dim(class_dim)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if target is not None:
            _checks.choice("target", target, TARGETS)
        module = None
        if embedding is not None:
            module = resolve_embedding(model, embedding)
            if target is None:
                target = "output"
            elif target == "input":
                raise ValueError("target 'input' perturbs the model's input; do not pass embedding= with it")
        else:
            if target in ("output", "weight"):
                raise ValueError(f"target {target!r} needs embedding= (the model's nn.Embedding or its name)")
            target = "input"
        if norm is None:
            norm = "global" if target == "weight" else "sample"
        _checks.choice("norm", norm, WeightTarget.allowed_norms if target == "weight" else ("global", "sample", "token"))
        self.model = model
        self.embedding = module
        self.target = target
        self.norm = norm
        self.generator = generator
        self.drop_labels = drop_labels
        if target == "input":
            self._target = InputTarget(norm, generator)
        elif target == "output":
            self._target = OutputTarget(module, norm, generator)
        else:
            self._target = WeightTarget(module, norm, generator)
        # a language model's vocabulary head: its input is taken instead of [..., V] logits (_lm_head.py)
        self._head = None
        if head is not None:
            if class_dim not in (None, -1):
                raise ValueError("class_dim does not apply with head=: the head's output dim holds the vocabulary")
            self._head = HeadCapture(model, head)
        # how the call's labels mark the positions a language model trains (None: they do not)
        self._label_shift = label_shift(model, head)
        self._labels = None
        self._positions = None  # the call's trained positions, from its labels and the clean logits' shape
        self._busy = False
        self._given_logits = None  # the caller's logits= during a call, checked against the model's

    @property
    def head(self):
        """The language-model head passed as ``head=`` (its input is taken instead of logits), or None."""
        return None if self._head is None else self._head.module

    # -- plumbing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _call(self, args, kwargs):
        """Validate, snapshot state, and yield (args, kwargs) ready for the model."""
        if self._busy:
            raise RuntimeError(
                f"{type(self).__name__} was called again while one of its calls is running "
                "(e.g. from inside the model's forward); use a second instance for nested use"
            )
        self._labels = kwargs.get("labels") if self._label_shift is not None else None
        self._positions = None
        if self.drop_labels:
            kwargs = strip_labels(kwargs)
        t = self._target
        t.begin_call()
        args, kwargs = t.prepare(args, kwargs)
        self._busy = True
        self._given_logits = None
        try:
            with StateGuard(self.model, self.generator):
                yield args, kwargs
        finally:
            t.end_call()
            self._busy = False
            self._given_logits = None
            self._labels = None
            self._positions = None

    def _run(self, args, kwargs):
        """One pass of the model with the target's current spec in place; returns what the model returns."""
        t = self._target
        with t.installed(), self._capturing():
            out = self.model(*t.apply_to_args(args), **kwargs)
        t.check_reached()
        return out

    def _capturing(self):
        return self._head.capturing() if self._head is not None else contextlib.nullcontext()

    def _forward(self, args, kwargs):
        """One pass of the model with the target's current spec in place; returns the logits (with
        ``head=``: the head's input, the final hidden states)."""
        out = self._run(args, kwargs)
        if self._head is not None:
            return self._head.take()
        q = extract_logits(out)
        given = self._given_logits
        if given is not None:
            if given.device != q.device:
                raise ValueError(f"logits is on {given.device} but the model's logits are on {q.device}")
            if given.shape != q.shape:
                raise ValueError(
                    f"logits has shape {tuple(given.shape)} but the model returned logits of shape {tuple(q.shape)}"
                )
        return q

    def _clean_logits(self, args, kwargs, logits):
        """The unperturbed logits (the caller's, or one pass of the model), class dim last; with
        ``head=``, the unperturbed hidden states."""
        if self._head is not None:
            if logits is not None:
                raise ValueError(
                    "logits= cannot be used with head=: the clean pass must give the head's input (the final "
                    "hidden states), which logits do not carry"
                )
            with torch.no_grad(), self._target.clean_pass(), self._head.capturing():
                self.model(*args, **kwargs)
            return self._note_positions(self._head.take().detach())
        if logits is not None:
            if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
                what = logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise TypeError(f"logits must be a floating-point tensor or None, got {what}")
            self._given_logits = logits
            return self._note_positions(class_last(logits.detach(), self.class_dim, what="the logits passed as logits="))
        with torch.no_grad(), self._target.clean_pass():
            return self._note_positions(self._class_last(extract_logits(self.model(*args, **kwargs)).detach()))

    def _note_positions(self, p):
        """Keeps the positions the call's labels train (a language model's), checked against the clean
        logits (or hidden states) ``p``; same positions on the fused and the unfused path."""
        if self._labels is not None:
            self._positions = trained_positions(self._labels, p.shape[:-1], self._label_shift).to(p.device)
        return p

    def _class_last(self, logits):
        """The model's logits laid out as the KL and the row mask take them: classes in the last dim."""
        if self._head is not None:
            return logits  # hidden states: the head's input dim is last already
        return class_last(logits, self.class_dim)

    def _row_mask(self, logits):
        mask = self._target.row_mask_for(logits)
        trained = self._positions
        if trained is None or tuple(trained.shape) != tuple(logits.shape[:-1]):
            return mask
        return trained if mask is None else trained & (mask != 0)

    def _divergence(self, p, q, reduction, *, train_head=True):
        """KL(p || q) over the class dim with the row mask: of logits, or (with ``head=``) of the head's
        outputs on the hidden states p and q, never materialised. ``train_head=False`` (a power step):
        no gradient for the head's parameters."""
        mask = self._row_mask(q)
        if self._head is None:
            return ops.kl_div_with_logits(p, q, mask=mask, reduction=reduction)
        w, b = self._head.weight, self._head.bias
        if not train_head:
            w, b = w.detach(), (None if b is None else b.detach())
        return ops.linear_kl_div(p, q, w, b, mask=mask, reduction=reduction)
