"""Supervised adversarial training: FGM and its multi-step form PGD."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from fastvat import _checks, _nonfinite, ops
from fastvat import reference as ref
from fastvat._defaults import NonfiniteMode, NormName, TargetName
from fastvat._regularizer import Regularizer


# Where a NaN/Inf appeared, as nonfinite="raise" names it (fastvat/_nonfinite.py).
LOSS_AT_X = "the loss at x (the unperturbed input)"
ADVERSARIAL = "the adversarial pass (the loss at x + r_adv)"


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
    """FGM and PGD: a supervised loss at x + r_adv. Same argument order as every regularizer,
    ``(model, embedding=None, *, ...)``; ``loss_fn`` is keyword-only."""

    _shared_settings = ("target", "norm", "generator", "nonfinite")

    def __init__(self, model: nn.Module, embedding: nn.Embedding | str | None = None, *,
                 loss_fn: Callable[..., torch.Tensor] | None = None, eps: float | None = None,
                 target: TargetName | None = None, norm: NormName | None = None,
                 generator: torch.Generator | None = None, nonfinite: NonfiniteMode = "raise") -> None:
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable or None, got {type(loss_fn).__name__}")
        # With loss_fn=None the model computes its own loss, so it must see the labels.
        super().__init__(model, embedding, norm=norm, target=target, generator=generator,
                         drop_labels=loss_fn is not None, nonfinite=nonfinite)
        self.loss_fn = loss_fn
        self.eps = _checks.finite_number("eps", self._default("eps", eps), positive=True)

    def _loss(self, args, kwargs, y):
        if self.loss_fn is None:
            return _model_loss(self._run(args, kwargs))
        return self.loss_fn(self._forward(args, kwargs), y)

    def _check_y(self, y):
        if self.loss_fn is not None and y is None:
            raise ValueError("y (the targets passed to loss_fn) is required")

    def _grad(self, args, kwargs, y, checks, loss_where, grad_where):
        """g = d loss / d r at the current r. Unless nonfinite="ignore", appends (where, finite?, is the
        gradient) for the loss and for g to ``checks`` — 0-dim bool tensors, no host sync."""
        with torch.enable_grad():
            loss = self._loss(args, kwargs, y)
            r = self._target.current
            g = torch.autograd.grad(loss, r, allow_unused=True)[0] if loss.requires_grad else None
        # A loss that does not depend on r has a zero gradient (and then a zero-norm step, not NaN).
        g = torch.zeros_like(r) if g is None else g
        if self.nonfinite != "ignore":
            checks.append((loss_where, _nonfinite.finite(loss), False))
            checks.append((grad_where, _nonfinite.finite(g), True))
        return g

    def _zero_perturbation(self, checks):
        """nonfinite="zero": whether a gradient was non-finite (one host check), so that the caller uses a
        zero perturbation; warns unless the loss at x itself failed (the final loss check reports that)."""
        if self.nonfinite != "zero" or bool(_nonfinite.all_true([ok for _, ok, grad in checks if grad])):
            return False
        where = _nonfinite.first_bad(checks)
        if where != LOSS_AT_X:
            _nonfinite.warn_zero_perturbation(type(self).__name__, where, stacklevel=3)
        return True

    def _final_loss(self, args, kwargs, y, checks):
        """The loss at x + r_adv, checked: "raise" every pass's loss and gradient and this loss (one host
        check); "zero" the loss at x and this loss (a bad gradient already became a zero perturbation)."""
        loss = self._loss(args, kwargs, y)
        if self.nonfinite == "ignore":
            return loss
        if self.nonfinite == "zero":
            checks = [c for c in checks if c[0] == LOSS_AT_X]
        ok = _nonfinite.all_true([c[1] for c in checks]) if checks else None
        return _nonfinite.checked_loss(type(self).__name__, self.nonfinite, loss, ok,
                                       lambda: _nonfinite.first_bad(checks) or ADVERSARIAL, stacklevel=3)


class FGM(_Supervised):
    """Fast gradient method: ``r = eps · g/||g||``, ``g = grad_x loss(f(x), y)``; returns the loss at x + r.

    ``fgm = fastvat.FGM(model, model.get_input_embeddings(), loss_fn=F.cross_entropy)``;
    ``loss = loss_clean + fgm(input_ids, attention_mask=m, y=labels)``. With ``loss_fn=None`` the
    model's own ``.loss`` is used (Hugging Face models called with ``labels=``).
    ``nonfinite`` (as VAT's): ``"raise"`` (default) a ``FloatingPointError`` naming where a NaN/Inf
    appeared (the loss at x, its gradient, the adversarial pass); ``"zero"`` a zero perturbation for a
    non-finite gradient (or a zero loss), with a warning; ``"ignore"`` skips the check.

    Args:
        model, embedding: as in every regularizer (``fastvat._regularizer.Regularizer``); a loss
            function passed positionally (the old ``FGM(model, loss_fn)`` order) is a ``TypeError``.
        loss_fn: ``loss_fn(logits, y)``; ``None``: the model's own ``.loss`` (labels passed through).
        eps: the norm of the perturbation per norm group; ``None``: the per-target default
            (``fastvat._defaults.DEFAULTS``).
        target, norm, generator, nonfinite: as in every regularizer.

    Raises:
        TypeError: a non-callable ``loss_fn`` or another wrongly typed argument.
        ValueError: a non-finite or non-positive ``eps``, an unknown choice.
    """

    _own_settings = ("loss_fn", "eps")

    def __call__(self, *args: Any, y: Any = None, **kwargs: Any) -> torch.Tensor:
        """The loss at x + r_adv, ``r_adv = eps · g/||g||`` with ``g`` the loss gradient at x.

        Args:
            *args, **kwargs: the model's inputs, as ``model(*args, **kwargs)`` takes them.
            y: the targets passed to ``loss_fn`` (required with it).

        Returns:
            The adversarial loss, a tensor with gradients for the model's parameters.

        Raises:
            ValueError: ``y`` missing with ``loss_fn``.
            TypeError: ``loss_fn=None`` and the model's output carries no ``.loss``.
            FloatingPointError: a NaN/Inf under ``nonfinite="raise"``.
        """
        self._check_y(y)
        with self._call(args, kwargs) as (args, kwargs):
            t = self._target
            t.zeros(requires_grad=True)
            checks: list = []
            g = self._grad(args, kwargs, y, checks, LOSS_AT_X, "the gradient of the loss at x")
            if self._zero_perturbation(checks):
                g = torch.zeros_like(g)
            t.direction(g, self.eps)
            return self._final_loss(args, kwargs, y, checks)


class PGD(_Supervised):
    """Projected gradient descent: ``steps`` ascent steps of size ``alpha`` (normalised gradient),
    each projected back onto the ball ``||r|| <= eps`` per norm group; returns the loss at x + r.
    ``nonfinite`` as FGM's: a non-finite gradient in any step gives a zero perturbation under ``"zero"``.

    Args:
        model, embedding, loss_fn, eps, target, norm, generator, nonfinite: as for ``FGM``.
        alpha: the size of each ascent step; ``None``: ``2.5 * eps / steps``.
        steps: ascent steps (>= 1). Not ``VAT``'s ``iters``: those are power iterations that find a
            direction, these are projected gradient-ascent steps that each move r by ``alpha``.
        random_start: start from a random point of norm ``eps`` instead of zero.

    Raises:
        TypeError: a wrongly typed argument (a non-bool ``random_start``, a non-int ``steps``).
        ValueError: ``steps=0``, a non-finite or non-positive ``eps``/``alpha``.
    """

    _own_settings = ("loss_fn", "eps", "alpha", "steps", "random_start")

    def __init__(self, model: nn.Module, embedding: nn.Embedding | str | None = None, *,
                 loss_fn: Callable[..., torch.Tensor] | None = None, eps: float | None = None,
                 alpha: float | None = None, steps: int = 3, random_start: bool = False,
                 target: TargetName | None = None, norm: NormName | None = None,
                 generator: torch.Generator | None = None, nonfinite: NonfiniteMode = "raise") -> None:
        super().__init__(model, embedding, loss_fn=loss_fn, eps=eps, norm=norm, target=target, generator=generator,
                         nonfinite=nonfinite)
        self.steps = _checks.nonnegative_int("steps", steps)
        if self.steps == 0:
            raise ValueError("steps must be >= 1")
        self.alpha = _checks.finite_number("alpha", 2.5 * self.eps / self.steps if alpha is None else alpha,
                                           positive=True)
        self.random_start = _checks.flag("random_start", random_start)

    def _project(self, r):
        if r.numel() == 0:  # an empty batch: nothing to project
            return r
        n = ref.group_norm(r, self.norm)
        factor = torch.clamp(self.eps / n.clamp_min(torch.finfo(n.dtype).tiny), max=1.0)
        return (r * factor).to(r.dtype)

    def __call__(self, *args: Any, y: Any = None, **kwargs: Any) -> torch.Tensor:
        """The loss at x + r after ``steps`` projected ascent steps.

        Args:
            *args, **kwargs: the model's inputs, as ``model(*args, **kwargs)`` takes them.
            y: the targets passed to ``loss_fn`` (required with it).

        Returns:
            The adversarial loss, a tensor with gradients for the model's parameters.

        Raises:
            As ``FGM.__call__``.
        """
        self._check_y(y)
        with self._call(args, kwargs) as (args, kwargs):
            t = self._target
            if self.random_start:
                t.random(self.eps, requires_grad=True)
            else:
                t.zeros(requires_grad=True)
            checks: list = []
            for step in range(self.steps):
                g = self._grad(args, kwargs, y, checks, *self._places(step))
                r = t.current.detach()
                r = self._project(r + ops.l2_normalize(g, scale=self.alpha, norm=self.norm, mask=t.mask))
                t.value(r, requires_grad=step + 1 < self.steps)
            if self._zero_perturbation(checks):
                t.value(torch.zeros_like(r))
            return self._final_loss(args, kwargs, y, checks)

    def _places(self, step):
        """Where the loss and the gradient of ascent step ``step`` are, for nonfinite's messages."""
        which = f"ascent step {step + 1} of {self.steps}"
        if step == 0 and not self.random_start:
            return LOSS_AT_X, f"the gradient of the loss at x ({which})"
        return f"{which} (the loss at x + r)", f"{which} (the gradient of the loss at x + r)"
