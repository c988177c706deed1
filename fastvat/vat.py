"""Virtual adversarial training: ``fastvat.VAT`` and the drop-in ``fastvat.VATLoss``."""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from fastvat import _checks, _defaults, _hvp, _nonfinite
from fastvat._defaults import NonfiniteMode, NormName, TargetName
from fastvat._regularizer import Regularizer

# The per-target defaults (eps, xi, norm) live in one table shared by every regularizer; the
# reasons for each value are there.
DEFAULTS = _defaults.DEFAULTS

POWER = "the power iteration (the model's logits or their gradient at x + xi*d)"
ADVERSARIAL = "the adversarial pass (the model's logits at x + r_adv)"


class VAT(Regularizer):
    """Virtual adversarial loss for ``model`` (Miyato et al.; the article's semantics by default).

    ``vat = fastvat.VAT(model)`` perturbs the model's input; ``fastvat.VAT(model, embedding=emb)``
    perturbs the output of the ``nn.Embedding`` ``emb`` (default) or, with ``target="weight"``,
    its vocabulary matrix (the article's semantics, done out of place). Then::

        loss = loss_sup + vat(*args, **kwargs)        # same arguments as model(*args, **kwargs)

    ``vat(..., logits=clean_logits)`` reuses logits the caller already has (no extra forward).
    Power iterations differentiate with respect to the perturbation only: no weight gradients,
    ``.grad`` untouched; BatchNorm statistics and ``training`` flags come out as they went in.
    ``nonfinite``: ``"raise"`` (default) a ``FloatingPointError`` naming where a NaN/Inf appeared
    (clean logits, power iteration, adversarial pass); ``"zero"`` a zero perturbation (or a zero
    loss) for that call, with a warning; ``"ignore"`` skips the check (no host sync).
    ``hvp``: the power step. ``"auto"`` (default): the finite difference in float32/float64, the exact
    xi -> 0 step (one jvp + one vjp, fastvat._hvp) in fp16/bf16, where x + xi*d rounds back to x;
    ``"exact"`` or ``"finite_difference"`` force one (docs/integrations.md, "Mixed precision").
    ``class_dim``: the dim of the logits that holds the classes. Default: the last (``[B, C]``,
    ``[B, T, C]``), so a Conv1d's ``[N, C, L]`` needs ``class_dim=1``; 4+ dims need it said; never 0.

    Args:
        model: the ``nn.Module`` to regularize.
        embedding: an ``nn.Embedding`` of ``model`` or its dotted name (targets ``"output"`` and
            ``"weight"``); ``None``: the model's first positional input is perturbed.
        xi: the finite-difference step of the power iteration; ``None``: the per-target default
            (``fastvat._defaults.DEFAULTS``: 0.1 for input/output, 10 for weight).
        eps: the norm of the adversarial perturbation; ``None``: the per-target default (1 for input
            and weight, 5 for output).
        iters: power iterations (0: a random direction, i.e. ``RandomNoise`` at the same ``eps``).
            Named as in the VAT paper's K; ``PGD``'s ``steps`` are ascent steps, a different thing.
        target, norm, generator, drop_labels, nonfinite, class_dim, head: as in every regularizer
            (``fastvat._regularizer.Regularizer``).
        hvp: ``"auto"``, ``"exact"`` or ``"finite_difference"`` (the power step, above).

    Raises:
        TypeError: a wrongly typed argument, named in the message.
        ValueError: a non-finite or non-positive ``xi``/``eps``, a negative ``iters``, an unknown
            choice, or ``hvp="exact"`` with ``head=``.
    """

    _own_settings = ("xi", "eps", "iters", "hvp")

    def __init__(self, model: nn.Module, embedding: nn.Embedding | str | None = None, *,
                 xi: float | None = None, eps: float | None = None, iters: int = 1,
                 hvp: str = "auto", target: TargetName | None = None, norm: NormName | None = None,
                 generator: torch.Generator | None = None, drop_labels: bool = True,
                 nonfinite: NonfiniteMode = "raise", class_dim: int | None = None,
                 head: nn.Module | None = None) -> None:
        super().__init__(model, embedding, norm=norm, target=target, generator=generator, drop_labels=drop_labels,
                         nonfinite=nonfinite, class_dim=class_dim, head=head)
        if head is not None and hvp == "exact":
            raise ValueError(
                "hvp='exact' cannot be used with head=: the exact step needs the logits' tangents, which the "
                "fused head never forms; use hvp='finite_difference' (or 'auto') with a xi that is large next to "
                "rounding in the model's dtype"
            )
        self.xi = _checks.finite_number("xi", self._default("xi", xi), positive=True)
        self.eps = _checks.finite_number("eps", self._default("eps", eps), positive=True)
        self.iters = _checks.nonnegative_int("iters", iters)
        # Power step: "finite_difference" (xi matters), "exact" (the xi -> 0 limit, see fastvat._hvp),
        # "auto": exact when it would run in fp16/bf16, where x + xi*d rounds back to x.
        self.hvp = _checks.choice("hvp", hvp, _hvp.MODES)

    @property
    def exact_unavailable(self) -> bool:
        """Whether the model has shown that it has no forward-mode AD ("auto" then stays on finite
        differences). Remembered per model for as long as the model lives (fastvat._hvp)."""
        return _hvp.lacks_forward_ad(self.model)

    def _exact_fell_back(self, exc):
        _hvp.remember_no_forward_ad(self.model)
        warnings.warn(
            "fastvat.VAT: the model does not support forward-mode AD, so the exact low-precision power step is "
            f"unavailable ({exc}); falling back to finite differences, which need xi to be large next to the "
            "perturbed tensor in fp16/bf16.",
            RuntimeWarning,
            stacklevel=4,
        )

    def _start(self, scale, *, requires_grad=False):
        """The power iteration's first direction: a random draw, normalised to ``scale``."""
        self._target.random(scale, requires_grad=requires_grad)

    def _adversarial_direction(self, args, kwargs, p_logits):
        """Power iteration: d <- grad_d D(p, f(x + xi d/|d|)); returns d (None when iters == 0)."""
        t = self._target
        d = None
        exact = self.iters > 0 and self._head is None and _hvp.use_exact(
            self.hvp, self.exact_unavailable, self.model, t.perturbed_like(args))
        for _ in range(self.iters):
            if exact:
                try:
                    d = _hvp.exact_step(self.model, t, args, kwargs, d, start=lambda: self._start(1.0),
                                        class_last=self._class_last, strict=self.hvp == "exact",
                                        row_mask=self._row_mask)
                    continue
                except _hvp.FallBack as exc:
                    self._exact_fell_back(exc)
                    exact = False
            if d is None:
                self._start(self.xi, requires_grad=True)
            else:
                t.direction(d, self.xi, requires_grad=True)
            with torch.enable_grad():
                q = self._class_last(self._forward(args, kwargs))
                div = self._divergence(p_logits, q, "sum", train_head=False)
                r = t.current
                d = torch.autograd.grad(div, r, allow_unused=True)[0] if div.requires_grad else None
                if d is None:  # D does not depend on r (a model that ignores it): zero direction, zero r
                    d = torch.zeros_like(r)
        return d

    def _set_final(self, d):
        t = self._target
        if d is None:
            self._start(self.eps)
        else:
            t.direction(d, self.eps)

    def __call__(self, *args: Any, logits: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """L_vat = D(p, f(x + r_adv)), a scalar with gradients for the model's parameters.

        Args:
            *args, **kwargs: the model's inputs, exactly as ``model(*args, **kwargs)`` takes them
                (``labels=`` is dropped unless ``drop_labels=False``).
            logits: the model's clean logits for these inputs, if the caller has them (saves a
                forward); detached here. Not with ``head=``.

        Returns:
            The batch-mean KL divergence, a 0-dim tensor.

        Raises:
            FloatingPointError: a NaN/Inf under ``nonfinite="raise"``, naming where it appeared.
            ValueError: ``logits`` of the wrong shape or device, or a model whose forward does not
                reach the target.
            RuntimeError: a nested call on the same instance.
        """
        with self._call(args, kwargs) as (args, kwargs):
            p = self._clean_logits(args, kwargs, logits)
            d = self._finite_direction(self._adversarial_direction(args, kwargs, p), p)
            self._set_final(d)
            q = self._class_last(self._forward(args, kwargs))
            if q.shape != p.shape:
                raise ValueError(f"logits has shape {tuple(p.shape)} but the model returned {tuple(q.shape)}")
            loss = self._divergence(p, q, "batchmean")
            return self._finite_loss(loss, p, d, logits is not None)

    def perturbation(self, *args: Any, logits: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """r_adv (detached), shaped like the perturbed tensor (weight target: [V, H], zero off-batch).

        Args:
            *args, **kwargs, logits: as for ``__call__``.

        Returns:
            The adversarial perturbation, detached, of norm ``eps`` per norm group.

        Raises:
            FloatingPointError: a NaN/Inf under ``nonfinite="raise"``.
            ValueError, RuntimeError: as for ``__call__``.
        """
        with self._call(args, kwargs) as (args, kwargs):
            p = self._clean_logits(args, kwargs, logits)
            t = self._target
            d = self._finite_direction(self._adversarial_direction(args, kwargs, p), p)
            if d is None:
                # The random start is realised when the forward reaches the target.
                self._start(self.eps)
                with torch.no_grad():
                    self._forward(args, kwargs)
            else:
                t.direction(d, self.eps)
                if self.target == "input":
                    t.realise_for(tuple(args[0].shape), args[0].detach())
                else:
                    t.current = t._normalise(d, self.eps, d)
            r = t.dense(t.current).detach()
            if self.nonfinite == "raise" and not bool(_nonfinite.finite(r)):
                raise FloatingPointError(
                    f"VAT: non-finite value (NaN or Inf) in {self._where_nonfinite(p, d, logits is not None)}"
                )
            return r

    # -- NaN / Inf (nonfinite=, fastvat/_nonfinite.py) ------------------------------------------
    def _finite_direction(self, d, p):
        """nonfinite="zero": a power-iteration direction holding NaN/Inf becomes a zero perturbation."""
        if self.nonfinite != "zero":
            return d
        # No warning when the clean logits are bad: the loss check reports those (and zeroes the loss).
        return _nonfinite.zero_direction("VAT", d, POWER, warn=lambda: not bool(self._bad_logits(p)),
                                         stacklevel=3)

    def _bad_logits(self, p):
        return _nonfinite.bad_logits(p, self._row_mask(p))

    def _where_nonfinite(self, p, d, given):
        if bool(self._bad_logits(p)):
            return _nonfinite.GIVEN if given else _nonfinite.CLEAN
        if d is not None and not bool(_nonfinite.finite(d)):
            return POWER
        return ADVERSARIAL

    def _finite_loss(self, loss, p, d, given):
        """One host check (of the loss and the clean logits, which a KL that takes 0·log 0 = 0 may not
        pass on to the loss); on NaN/Inf find where it came from, then raise or zero it."""
        if self.nonfinite == "ignore":
            return loss
        return _nonfinite.checked_loss("VAT", self.nonfinite, loss, ~self._bad_logits(p),
                                       lambda: self._where_nonfinite(p, d, given), stacklevel=3)


class VATLoss(nn.Module):
    """Drop-in for the ``VATLoss(xi, eps, ip)`` of common PyTorch snippets: ``vat_loss(model, x)``.

    Perturbs the input with a per-sample norm, like those snippets, on fastvat's fast path. An
    ``nn.Module`` with no parameters or buffers, as those snippets' class is, so ``.to()``,
    ``state_dict()`` and containers such as ``nn.ModuleDict`` work; the model it is called with is
    not a submodule of it (``.to()`` does not move it, ``state_dict()`` stays empty) and is not kept
    alive by it.

    Its positional ``(xi, eps, ip)`` and their defaults are those of the snippets it replaces, so
    existing code keeps its meaning: ``ip`` is ``VAT``'s ``iters`` under the snippets' name, and
    ``xi=10`` is their default, not ``VAT``'s per-target 0.1.

    Args:
        xi: the finite-difference step of the power iteration.
        eps: the norm of the adversarial perturbation, per sample.
        ip: power iterations (``VAT``'s ``iters``).
        class_dim: as in ``VAT``.

    Raises:
        TypeError, ValueError: as ``VAT`` for the same arguments (named ``ip`` here).
    """

    def __init__(self, xi: float = 10.0, eps: float = 1.0, ip: int = 1, *, class_dim: int | None = None) -> None:
        super().__init__()
        self.xi = _checks.finite_number("xi", xi, positive=True)
        self.eps = _checks.finite_number("eps", eps, positive=True)
        self.ip = _checks.nonnegative_int("ip", ip)
        self.class_dim = _checks.class_dim(class_dim)

    def extra_repr(self) -> str:
        return f"xi={self.xi}, eps={self.eps}, ip={self.ip}, class_dim={self.class_dim}"

    def forward(self, model: nn.Module, x: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """The VAT loss of ``model`` at ``x``.

        A ``VAT`` is built per call (one kept would keep the model alive); what one learns about a
        model across calls, that it has no forward-mode AD, is remembered per model by
        ``fastvat._hvp`` for as long as the model lives.

        Args:
            model: the ``nn.Module``, called as ``model(x)``.
            x: its input, perturbed with a per-sample norm.
            logits: ``model(x)``'s clean logits if the caller has them.

        Returns:
            The batch-mean KL divergence, a 0-dim tensor.

        Raises:
            As ``VAT.__call__``.
        """
        vat = VAT(model, xi=self.xi, eps=self.eps, iters=self.ip, norm="sample", class_dim=self.class_dim)
        return vat(x, logits=logits)
