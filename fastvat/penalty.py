"""Gradient penalty: the article's second-order view of noise training."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastvat import _checks, _fsdp, _nonfinite
from fastvat._defaults import NonfiniteMode, TargetName
from fastvat._model_io import math_attention
from fastvat._regularizer import Regularizer

FORMS = ("kl", "mse")
ESTIMATORS = ("rademacher", "exact")
LOGITS = "the model's logits at x"
GRADIENT = "the input gradient (the gradient of the model's outputs at x)"
# Measured with torch 2.14: the second backward fails with "setStorage: ... storage of size 0" when FSDP
# resharded after the first, and leaves every sharded gradient None when it did not.
FSDP_REASON = ("the penalty backpropagates through an input gradient (a double backward), and FSDP frees "
               "the gathered parameters that gradient's graph holds once the first backward ends (or, "
               "with resharding after backward off, the shards get no gradient at all); use "
               "DistributedDataParallel for a gradient penalty")


def _grad_or_zero(y, r):
    """d y / d r with a graph; zeros when y does not depend on r (a model that ignores its input)."""
    g = torch.autograd.grad(y, r, create_graph=True, allow_unused=True)[0] if y.requires_grad else None
    return torch.zeros_like(r) if g is None else g


class GradientPenalty(Regularizer):
    """Penalty on the input-gradient of the model, averaged over the batch.

    form ``"mse"``: ``sum_i ||grad_x f_i||²`` (what Gaussian noise on a squared loss adds, to
    second order); form ``"kl"``: ``sum_i ||grad_x p_i||² / p_i`` with ``p = softmax(f)`` (the
    KL case), computed as ``4 sum_i ||grad_x sqrt(p_i)||²``.
    estimator ``"exact"`` takes one gradient per output of an example, that is per class and per
    position of logits with positions (``[B, T, C]``, ``[N, C, H, W]``: classes x positions gradients,
    since a position's gradient may involve every input); fine for few outputs;
    ``"rademacher"`` takes one gradient of ``u·f`` (``u`` of ±1) per sample draw, an unbiased
    estimate whose cost does not grow with the number of outputs.
    The gradient is per example, which assumes the model mixes no information across the
    batch (BatchNorm in train mode does; use eval-mode BN or accept the approximation).
    ``nonfinite`` (as VAT's): ``"raise"`` (default) a ``FloatingPointError`` naming where a NaN/Inf
    appeared (the logits or their input gradient); ``"zero"`` a zero penalty for that call, with a
    warning; ``"ignore"`` skips the check.
    ``class_dim`` (as VAT's): the logits' class dim, over which form ``"kl"`` takes the softmax.
    No ``eps``, ``norm`` or ``head``: the penalty is the x -> 0 limit of noise, with no step size.

    Args:
        model, embedding: as in every regularizer (``fastvat._regularizer.Regularizer``).
        form: ``"kl"`` or ``"mse"`` (above).
        estimator: ``"rademacher"`` or ``"exact"`` (above).
        samples: Rademacher draws per call (>= 1). Not ``RandomNoise``'s ``k``: each of its draws is a
            noisy forward pass, each of these a probe vector for one more input-gradient backward
            through the same single forward.
        target: ``"input"`` or ``"output"`` (the weight target has no per-example gradient).
        generator, drop_labels, nonfinite, class_dim: as in every regularizer.

    Raises:
        TypeError: a wrongly typed argument.
        ValueError: an unknown ``form``/``estimator``, ``samples=0``, or ``target="weight"``.
    """

    _own_settings = ("form", "estimator", "samples")
    _shared_settings = ("target", "generator", "drop_labels", "nonfinite", "class_dim")

    def __init__(self, model: nn.Module, embedding: nn.Embedding | str | None = None, *, form: str = "kl",
                 estimator: str = "rademacher", samples: int = 1, target: TargetName | None = None,
                 generator: torch.Generator | None = None, drop_labels: bool = True,
                 nonfinite: NonfiniteMode = "raise", class_dim: int | None = None) -> None:
        super().__init__(model, embedding, norm=None, target=target, generator=generator, drop_labels=drop_labels,
                         nonfinite=nonfinite, class_dim=class_dim)
        if self.target == "weight":
            raise ValueError("target 'weight' has no per-example input gradient; use 'input' or 'output'")
        self.form = _checks.choice("form", form, FORMS)
        self.estimator = _checks.choice("estimator", estimator, ESTIMATORS)
        self.samples = _checks.nonnegative_int("samples", samples)
        if self.samples == 0:
            raise ValueError("samples must be >= 1")

    def _per_example_sqnorm(self, g):
        mask = self._target.mask
        if mask is not None:
            g = g * mask.reshape(mask.shape + (1,) * (g.dim() - mask.dim())).to(g.dtype)
        if g.dim() == 0:
            return g * g
        return (g * g).reshape(g.shape[0], -1).sum(1) if g.numel() else g.new_zeros(g.shape[0])

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The penalty at the model's inputs, averaged over the batch.

        Args:
            *args, **kwargs: the model's inputs, as ``model(*args, **kwargs)`` takes them.

        Returns:
            A 0-dim tensor with a graph through the input gradient (a double backward).

        Raises:
            RuntimeError: an FSDP-sharded model (the double backward cannot run under FSDP).
            FloatingPointError: a NaN/Inf under ``nonfinite="raise"``.
        """
        _fsdp.refuse(self.model, "GradientPenalty", FSDP_REASON)
        with self._call(args, kwargs) as (args, kwargs):
            t = self._target
            t.zeros(requires_grad=True)
            with torch.enable_grad(), math_attention():
                f = self._class_last(self._forward(args, kwargs))
                r = t.current
                out = f.float() if f.dtype in (torch.float16, torch.bfloat16) else f
                if self.form == "kl":
                    out = 2.0 * torch.softmax(out, dim=-1).clamp_min(1e-30).sqrt()
                if self.estimator == "exact":
                    # one output of every example at a time: summing a class over positions first
                    # would add up the positions' gradients before squaring them
                    per_example = out.flatten(1) if out.dim() > 1 else out.reshape(1, -1)
                    total = 0.0
                    for k in range(per_example.shape[1]):
                        g = _grad_or_zero(per_example[:, k].sum(), r)
                        total = total + self._per_example_sqnorm(g)
                    penalty = total.sum() / max(total.numel(), 1)  # an empty batch gives 0, not NaN
                else:
                    total = 0.0
                    for _ in range(self.samples):
                        # drawn where the generator lives (the model's device, as VAT's, or the CPU)
                        where = out.device if self.generator is None else self.generator.device
                        u = torch.randint(0, 2, out.shape, generator=self.generator, device=where).to(out.device)
                        u = u.to(out.dtype) * 2 - 1
                        g = _grad_or_zero((u * out).sum(), r)
                        total = total + self._per_example_sqnorm(g)
                    penalty = (total / self.samples).sum() / max(total.numel(), 1)
            if self.nonfinite == "ignore":
                return penalty
            # One host check: the penalty and the logits (a NaN logit need not reach the gradient, e.g.
            # in the "mse" form, where d(u·f)/df = u whatever f is).
            bad = _nonfinite.bad_logits(f.detach(), self._row_mask(f))
            return _nonfinite.checked_loss("GradientPenalty", self.nonfinite, penalty, ~bad,
                                           lambda: LOGITS if bool(bad) else GRADIENT, stacklevel=2)
