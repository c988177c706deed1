"""Supervised adversarial training: FGM and its multi-step form PGD."""
from __future__ import annotations

import torch

from fastvat import _checks, ops
from fastvat import reference as ref
from fastvat._model_io import extract_logits
from fastvat._regularizer import Regularizer


def _model_loss(output):
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            "loss_fn is None, so the model's output must carry a .loss (e.g. a Hugging Face model called "
            f"with labels=); got {type(output).__name__} without one"
        )
    return loss


class _Supervised(Regularizer):
    def __init__(self, model, loss_fn=None, embedding=None, *, eps=1.0, norm=None, target=None, generator=None):
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable or None, got {type(loss_fn).__name__}")
        # With loss_fn=None the model computes its own loss, so it must see the labels.
        super().__init__(model, embedding, norm=norm, target=target, generator=generator,
                         drop_labels=loss_fn is not None)
        self.loss_fn = loss_fn
        self.eps = _checks.finite_number("eps", eps, positive=True)

    def _loss(self, args, kwargs, y):
        t = self._target
        with t.installed():
            out = self.model(*t.apply_to_args(args), **kwargs)
        t.check_reached()
        if self.loss_fn is None:
            return _model_loss(out)
        return self.loss_fn(extract_logits(out), y)

    def _check_y(self, y):
        if self.loss_fn is not None and y is None:
            raise ValueError("y (the targets passed to loss_fn) is required")

    def _grad(self, args, kwargs, y):
        with torch.enable_grad():
            loss = self._loss(args, kwargs, y)
            r = self._target.current
            g = torch.autograd.grad(loss, r, allow_unused=True)[0] if loss.requires_grad else None
        # A loss that does not depend on r has a zero gradient (and then a zero-norm step, not NaN).
        return torch.zeros_like(r) if g is None else g


class FGM(_Supervised):
    """Fast gradient method: ``r = eps · g/||g||``, ``g = grad_x loss(f(x), y)``; returns the loss at x + r.

    ``fgm = fastvat.FGM(model, F.cross_entropy, embedding=model.get_input_embeddings())``;
    ``loss = loss_clean + fgm(input_ids, attention_mask=m, y=labels)``. With ``loss_fn=None`` the
    model's own ``.loss`` is used (Hugging Face models called with ``labels=``).
    """

    def __call__(self, *args, y=None, **kwargs):
        self._check_y(y)
        with self._call(args, kwargs) as (args, kwargs):
            t = self._target
            t.zeros(requires_grad=True)
            g = self._grad(args, kwargs, y)
            t.direction(g, self.eps)
            return self._loss(args, kwargs, y)


class PGD(_Supervised):
    """Projected gradient descent: ``steps`` ascent steps of size ``alpha`` (normalised gradient),
    each projected back onto the ball ``||r|| <= eps`` per norm group; returns the loss at x + r."""

    def __init__(self, model, loss_fn=None, embedding=None, *, eps=1.0, alpha=None, steps=3, random_start=False,
                 norm=None, target=None, generator=None):
        super().__init__(model, loss_fn, embedding, eps=eps, norm=norm, target=target, generator=generator)
        self.steps = _checks.nonnegative_int("steps", steps)
        if self.steps == 0:
            raise ValueError("steps must be >= 1")
        self.alpha = _checks.finite_number("alpha", 2.5 * self.eps / self.steps if alpha is None else alpha,
                                           positive=True)
        self.random_start = bool(random_start)

    def _project(self, r):
        if r.numel() == 0:  # an empty batch: nothing to project
            return r
        n = ref.group_sumsq(r.to(ref.acc_dtype(r.dtype)), self.norm).sqrt()
        factor = torch.clamp(self.eps / n.clamp_min(torch.finfo(n.dtype).tiny), max=1.0)
        return (r * factor).to(r.dtype)

    def __call__(self, *args, y=None, **kwargs):
        self._check_y(y)
        with self._call(args, kwargs) as (args, kwargs):
            t = self._target
            if self.random_start:
                t.random(self.eps, requires_grad=True)
            else:
                t.zeros(requires_grad=True)
            for step in range(self.steps):
                g = self._grad(args, kwargs, y)
                r = t.current.detach()
                r = self._project(r + ops.l2_normalize(g, scale=self.alpha, norm=self.norm, mask=t.mask))
                t.value(r, requires_grad=step + 1 < self.steps)
            return self._loss(args, kwargs, y)
