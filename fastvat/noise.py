"""Random-noise regularisation, the article's starting point (and VAT with iters=0 at the same eps)."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from fastvat import _checks, _nonfinite
from fastvat._defaults import NonfiniteMode, NormName, TargetName
from fastvat._lm_head import reverse_kl
from fastvat._regularizer import Regularizer


class RandomNoise(Regularizer):
    """Additive Gaussian noise on the input or an embedding, averaged over ``k`` draws.

    With ``eps`` (default) each draw is a Gaussian direction scaled to norm ``eps`` per norm group
    (exactly VAT with ``iters=0`` at the same ``eps``; both take their default ``eps`` from the one
    per-target table, so their defaults agree); with ``sigma`` it is raw ``N(0, sigma²)`` noise. Without
    ``loss_fn`` the loss is the consistency term ``KL(p(x) || p(x + r))`` (p constant, semi-
    supervised); with ``loss_fn`` it is ``loss_fn(f(x + r), y)`` (supervised noise training)::

        noise = fastvat.RandomNoise(model, eps=0.5, k=2)
        loss = loss_sup + noise(x)

    ``nonfinite`` (as VAT's): ``"raise"`` (default) a ``FloatingPointError`` naming where a NaN/Inf
    appeared (clean logits, or which noisy pass); ``"zero"`` a zero loss for that call, with a warning
    (the noise itself is always finite, so there is no direction to zero); ``"ignore"`` skips the check.
    ``class_dim`` (as VAT's): the logits' class dim for the KL; ``loss_fn`` gets the logits as the model
    returns them. ``symmetric=True``: ``KL(p || q) + KL(q || p)``, R3F's consistency term (Aghajanyan et
    al. 2020; R3F draws ``sigma`` noise, ``k=1``). ``head`` (as VAT's): a language model's vocabulary head,
    whose logits are never built.

    Args:
        model, embedding: as in every regularizer (``fastvat._regularizer.Regularizer``).
        eps: the norm of each draw per norm group; ``None``: the per-target default
            (``fastvat._defaults.DEFAULTS``). Ignored when ``sigma`` is given.
        sigma: the standard deviation of raw Gaussian noise instead of ``eps``-normalised draws.
        k: noise draws per call (>= 1).
        loss_fn: ``loss_fn(logits, y)`` for supervised noise training; ``None``: the KL consistency term.
        symmetric: ``KL(p || q) + KL(q || p)`` (R3F); not with ``loss_fn``.
        target, norm, generator, drop_labels, nonfinite, class_dim, head: as in every regularizer.

    Raises:
        TypeError: a wrongly typed argument (a non-bool ``symmetric``, a non-callable ``loss_fn``).
        ValueError: ``k=0``, a non-positive ``eps``/``sigma``, ``head`` or ``symmetric`` with ``loss_fn``.
    """

    _own_settings = ("eps", "sigma", "k", "loss_fn", "symmetric")

    def __init__(self, model: nn.Module, embedding: nn.Embedding | str | None = None, *,
                 eps: float | None = None, sigma: float | None = None, k: int = 1,
                 loss_fn: Callable[..., torch.Tensor] | None = None, symmetric: bool = False,
                 target: TargetName | None = None, norm: NormName | None = None,
                 generator: torch.Generator | None = None, drop_labels: bool = True,
                 nonfinite: NonfiniteMode = "raise", class_dim: int | None = None,
                 head: nn.Module | None = None) -> None:
        super().__init__(model, embedding, norm=norm, target=target, generator=generator, drop_labels=drop_labels,
                         nonfinite=nonfinite, class_dim=class_dim, head=head)
        if head is not None and loss_fn is not None:
            raise ValueError("head= serves the consistency term (no loss_fn): loss_fn would need the logits")
        symmetric = _checks.flag("symmetric", symmetric)
        if symmetric and loss_fn is not None:
            raise ValueError("symmetric=True is a symmetric KL consistency term; it does not combine with loss_fn")
        self.symmetric = symmetric
        if sigma is not None:
            self.sigma = _checks.finite_number("sigma", sigma, positive=True)
            self.eps = None
        else:
            self.sigma = None
            self.eps = _checks.finite_number("eps", self._default("eps", eps), positive=True)
        self.k = _checks.nonnegative_int("k", k)
        if self.k == 0:
            raise ValueError("k must be >= 1 (the number of noise draws per call)")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable or None, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn

    def __call__(self, *args: Any, logits: torch.Tensor | None = None, y: Any = None, **kwargs: Any) -> torch.Tensor:
        """The noise loss, averaged over the ``k`` draws.

        Args:
            *args, **kwargs: the model's inputs, as ``model(*args, **kwargs)`` takes them.
            logits: the clean logits, if the caller has them (consistency term only).
            y: the targets passed to ``loss_fn`` (required with it, unused without).

        Returns:
            A 0-dim tensor: the mean over draws of the KL term, or of ``loss_fn(f(x + r), y)``.

        Raises:
            ValueError: ``y`` missing with ``loss_fn``; ``logits`` of the wrong shape.
            FloatingPointError: a NaN/Inf under ``nonfinite="raise"``, naming the pass.
        """
        if self.loss_fn is not None and y is None:
            raise ValueError("y (the targets for loss_fn) is required when loss_fn is given")
        with self._call(args, kwargs) as (args, kwargs):
            p = None if self.loss_fn is not None else self._clean_logits(args, kwargs, logits)
            t = self._target
            check = self.nonfinite != "ignore"
            checks = []  # (where, 0-dim bool) per pass: no host sync until the end
            if check and p is not None:
                checks.append((_nonfinite.GIVEN if logits is not None else _nonfinite.CLEAN,
                               ~_nonfinite.bad_logits(p, self._row_mask(p))))
            total = 0.0
            for i in range(self.k):
                if self.sigma is not None:
                    t.gaussian(self.sigma)
                else:
                    t.random(self.eps)
                q = self._forward(args, kwargs)
                if self.loss_fn is None:
                    q = self._class_last(q)
                    term = self._divergence(p, q, "batchmean")
                    if self.symmetric:
                        term = term + reverse_kl(p, q, self._row_mask(q), "batchmean", head=self._head)
                else:
                    term = self.loss_fn(q, y)
                if check:
                    checks.append((self._where(i), _nonfinite.finite(term)))
                total = total + term
            loss = total / self.k
            if not check:
                return loss
            # One host check per call; on failure, the first non-finite place (clean logits or which pass).
            return _nonfinite.checked_loss("RandomNoise", self.nonfinite, loss,
                                           _nonfinite.all_true([ok for _, ok in checks]),
                                           lambda: _nonfinite.first_bad(checks) or "the average over the passes",
                                           stacklevel=2)

    def _where(self, i):
        what = "loss_fn of the model's logits" if self.loss_fn is not None else "the model's logits"
        which = "" if self.k == 1 else f" {i + 1} of {self.k}"
        return f"the noisy pass{which} ({what} at x + r)"
