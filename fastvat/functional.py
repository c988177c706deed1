"""One-call forms of the regularizers: ``fastvat.functional.vat_loss(model, x, eps=2.0)``.

Each builds the regularizer and calls it once, so it takes the class's settings as keyword
arguments and the model's inputs as ``*inputs`` plus ``model_kwargs`` (a dict: the model's own
keyword arguments would otherwise collide with the settings, e.g. a model that takes ``eps``).

What a call loses against a kept instance: nothing the result depends on. The regularizers keep no
state between calls that changes a loss: the random draws come from ``generator`` (or the global
RNG) and the one thing VAT learns about a model, that it has no forward-mode AD, is remembered per
model (``fastvat._hvp``), whichever form meets it. What it costs: argument validation and
hook-free setup per call (microseconds next to a forward pass); in a training loop keep an instance.

FGM and PGD have functional forms too: both are a pure function of (model, inputs, targets)
that returns the loss at ``x + r_adv``; nothing of theirs outlives a call.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn

from fastvat._defaults import NonfiniteMode, NormName, TargetName
from fastvat.adversarial import FGM, PGD
from fastvat.noise import RandomNoise
from fastvat.penalty import GradientPenalty
from fastvat.vat import VAT

__all__ = ["vat_loss", "vat_perturbation", "noise_loss", "gradient_penalty", "fgm_loss", "pgd_loss"]


def _kwargs(model_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    if model_kwargs is None:
        return {}
    if not isinstance(model_kwargs, Mapping):
        raise TypeError(f"model_kwargs must be a mapping of the model's keyword arguments or None, "
                        f"got {type(model_kwargs).__name__}")
    return dict(model_kwargs)


def vat_loss(model: nn.Module, *inputs: Any, model_kwargs: Mapping[str, Any] | None = None,
             logits: torch.Tensor | None = None, embedding: nn.Embedding | str | None = None,
             xi: float | None = None, eps: float | None = None, iters: int = 1, hvp: str = "auto",
             target: TargetName | None = None, norm: NormName | None = None,
             generator: torch.Generator | None = None, drop_labels: bool = True,
             nonfinite: NonfiniteMode = "raise", class_dim: int | None = None,
             head: nn.Module | None = None) -> torch.Tensor:
    """``fastvat.VAT(model, embedding, **settings)(*inputs, logits=logits, **model_kwargs)``.

    Args:
        model: the ``nn.Module``.
        *inputs: the model's positional inputs.
        model_kwargs: the model's keyword inputs (e.g. ``{"attention_mask": m}``).
        logits: the clean logits, if the caller has them.
        embedding, xi, eps, iters, hvp, target, norm, generator, drop_labels, nonfinite, class_dim,
            head: as for ``fastvat.VAT``.

    Returns:
        The VAT loss, a 0-dim tensor.

    Raises:
        TypeError, ValueError, FloatingPointError, RuntimeError: as ``fastvat.VAT`` and its call.
    """
    vat = VAT(model, embedding, xi=xi, eps=eps, iters=iters, hvp=hvp, target=target, norm=norm,
              generator=generator, drop_labels=drop_labels, nonfinite=nonfinite, class_dim=class_dim, head=head)
    return vat(*inputs, logits=logits, **_kwargs(model_kwargs))


def vat_perturbation(model: nn.Module, *inputs: Any, model_kwargs: Mapping[str, Any] | None = None,
                     logits: torch.Tensor | None = None, embedding: nn.Embedding | str | None = None,
                     xi: float | None = None, eps: float | None = None, iters: int = 1, hvp: str = "auto",
                     target: TargetName | None = None, norm: NormName | None = None,
                     generator: torch.Generator | None = None, drop_labels: bool = True,
                     nonfinite: NonfiniteMode = "raise", class_dim: int | None = None,
                     head: nn.Module | None = None) -> torch.Tensor:
    """``fastvat.VAT(...).perturbation(*inputs, ...)``: r_adv, detached (arguments as ``vat_loss``).

    Returns:
        The adversarial perturbation, shaped like the perturbed tensor.

    Raises:
        As ``vat_loss``.
    """
    vat = VAT(model, embedding, xi=xi, eps=eps, iters=iters, hvp=hvp, target=target, norm=norm,
              generator=generator, drop_labels=drop_labels, nonfinite=nonfinite, class_dim=class_dim, head=head)
    return vat.perturbation(*inputs, logits=logits, **_kwargs(model_kwargs))


def noise_loss(model: nn.Module, *inputs: Any, model_kwargs: Mapping[str, Any] | None = None,
               logits: torch.Tensor | None = None, y: Any = None, embedding: nn.Embedding | str | None = None,
               eps: float | None = None, sigma: float | None = None, k: int = 1,
               loss_fn: Callable[..., torch.Tensor] | None = None, symmetric: bool = False,
               target: TargetName | None = None, norm: NormName | None = None,
               generator: torch.Generator | None = None, drop_labels: bool = True,
               nonfinite: NonfiniteMode = "raise", class_dim: int | None = None,
               head: nn.Module | None = None) -> torch.Tensor:
    """``fastvat.RandomNoise(model, embedding, **settings)(*inputs, logits=logits, y=y, **model_kwargs)``.

    Args:
        model, *inputs, model_kwargs, logits: as for ``vat_loss``.
        y: the targets for ``loss_fn``.
        embedding, eps, sigma, k, loss_fn, symmetric, target, norm, generator, drop_labels, nonfinite,
            class_dim, head: as for ``fastvat.RandomNoise``.

    Returns:
        The noise loss, a 0-dim tensor.

    Raises:
        As ``fastvat.RandomNoise`` and its call.
    """
    noise = RandomNoise(model, embedding, eps=eps, sigma=sigma, k=k, loss_fn=loss_fn, symmetric=symmetric,
                        target=target, norm=norm, generator=generator, drop_labels=drop_labels,
                        nonfinite=nonfinite, class_dim=class_dim, head=head)
    return noise(*inputs, logits=logits, y=y, **_kwargs(model_kwargs))


def gradient_penalty(model: nn.Module, *inputs: Any, model_kwargs: Mapping[str, Any] | None = None,
                     embedding: nn.Embedding | str | None = None, form: str = "kl",
                     estimator: str = "rademacher", samples: int = 1, target: TargetName | None = None,
                     generator: torch.Generator | None = None, drop_labels: bool = True,
                     nonfinite: NonfiniteMode = "raise", class_dim: int | None = None) -> torch.Tensor:
    """``fastvat.GradientPenalty(model, embedding, **settings)(*inputs, **model_kwargs)``.

    Args:
        model, *inputs, model_kwargs: as for ``vat_loss``.
        embedding, form, estimator, samples, target, generator, drop_labels, nonfinite, class_dim: as
            for ``fastvat.GradientPenalty``.

    Returns:
        The penalty, a 0-dim tensor.

    Raises:
        As ``fastvat.GradientPenalty`` and its call.
    """
    penalty = GradientPenalty(model, embedding, form=form, estimator=estimator, samples=samples, target=target,
                              generator=generator, drop_labels=drop_labels, nonfinite=nonfinite,
                              class_dim=class_dim)
    return penalty(*inputs, **_kwargs(model_kwargs))


def fgm_loss(model: nn.Module, *inputs: Any, model_kwargs: Mapping[str, Any] | None = None, y: Any = None,
             embedding: nn.Embedding | str | None = None, loss_fn: Callable[..., torch.Tensor] | None = None,
             eps: float | None = None, target: TargetName | None = None, norm: NormName | None = None,
             generator: torch.Generator | None = None, nonfinite: NonfiniteMode = "raise") -> torch.Tensor:
    """``fastvat.FGM(model, embedding, **settings)(*inputs, y=y, **model_kwargs)``.

    Args:
        model, *inputs, model_kwargs: as for ``vat_loss``.
        y: the targets for ``loss_fn`` (required with it).
        embedding, loss_fn, eps, target, norm, generator, nonfinite: as for ``fastvat.FGM``.

    Returns:
        The loss at x + r_adv.

    Raises:
        As ``fastvat.FGM`` and its call.
    """
    fgm = FGM(model, embedding, loss_fn=loss_fn, eps=eps, target=target, norm=norm, generator=generator,
              nonfinite=nonfinite)
    return fgm(*inputs, y=y, **_kwargs(model_kwargs))


def pgd_loss(model: nn.Module, *inputs: Any, model_kwargs: Mapping[str, Any] | None = None, y: Any = None,
             embedding: nn.Embedding | str | None = None, loss_fn: Callable[..., torch.Tensor] | None = None,
             eps: float | None = None, alpha: float | None = None, steps: int = 3, random_start: bool = False,
             target: TargetName | None = None, norm: NormName | None = None,
             generator: torch.Generator | None = None, nonfinite: NonfiniteMode = "raise") -> torch.Tensor:
    """``fastvat.PGD(model, embedding, **settings)(*inputs, y=y, **model_kwargs)``.

    Args:
        model, *inputs, model_kwargs, y: as for ``fgm_loss``.
        embedding, loss_fn, eps, alpha, steps, random_start, target, norm, generator, nonfinite: as for
            ``fastvat.PGD``.

    Returns:
        The loss at x + r after the ascent steps.

    Raises:
        As ``fastvat.PGD`` and its call.
    """
    pgd = PGD(model, embedding, loss_fn=loss_fn, eps=eps, alpha=alpha, steps=steps, random_start=random_start,
              target=target, norm=norm, generator=generator, nonfinite=nonfinite)
    return pgd(*inputs, y=y, **_kwargs(model_kwargs))
