"""The article's in-place perturbation of an embedding matrix, with a bit-exact restore.

``fastvat.ops.perturb_`` / ``restore_`` follow the article: ``W += r`` before the adversarial pass,
``W -= r`` after it. In floating point ``(W + r) - r`` is not ``W``: each cycle rounds twice, and the
error accumulates as a random walk over training (docs/reliability.md has the numbers: on a 30522x64
N(0, 0.02) matrix with the article's eps = 1, 6% of the entries move in the first cycle and 64% after
1,000 cycles; the drift is then 1.1% of the weights' norm in bf16, 2e-7 of it in fp32; 3.9% in bf16
with eps = 10). ``ExactPerturbation`` keeps instead a copy of ``W`` taken before the first
perturbation and restores by copying it back, so the matrix comes out bit-identical however many
cycles run::

    pert = fastvat.inplace.ExactPerturbation(model.get_input_embeddings().weight)
    for batch in loader:
        ...
        with pert.perturbed(direction, scale=eps):     # W <- W + eps * d / ||d||  (global norm)
            loss_adv = loss_fn(model(batch), y)
            loss_adv.backward()                        # gradients at W + r, as in the article
        optimizer.step()                               # W is bit-exactly back before the step

Memory: one buffer of the weight's shape and dtype (V·H elements: 30522x768 is 94 MB in fp32,
47 MB in bf16), allocated on first use and reused. That is what ``perturb_``/``restore_`` keep
anyway (the ``previous`` delta buffer), so exactness costs no extra memory. A scheme that stores
only the rounding residual cannot be smaller in general: when ``|r|`` is much larger than ``|W|``
(eps = 10 on N(0, 0.02) weights) the bits of ``W`` lost in ``W + r`` are most of them.

Time per cycle: one copy ``W -> backup``, one global-norm pass over ``d``, one fused
``W = backup + d * (scale / ||d||)``, and one copy back, about the memory traffic of
``perturb_`` + ``restore_``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, cast

import torch

from fastvat import _checks, _torch_internals
from fastvat import reference as ref

__all__ = ["ExactPerturbation", "perturbed_"]


class ExactPerturbation:
    """``W += scale * d / ||d||`` in place (global L2 norm), undone bit-exactly by ``restore()``.

    ``apply`` while a perturbation is active replaces it (``W = W_saved + new``: no rounding
    accumulates across steps, e.g. several ascent steps on the matrix). ``restore`` refuses (a
    ``RuntimeError``) when something else wrote ``W`` in place since ``apply`` — an optimizer step
    or a ``max_norm`` embedding — because copying the saved matrix back would discard that write;
    ``restore(force=True)`` does it anyway. Writes through ``.data`` are not detected.

    Args:
        weight: the floating-point tensor to perturb in place (e.g. an embedding's ``.weight``).

    Raises:
        TypeError: ``weight`` is not a floating-point tensor.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        _checks.tensor("weight", weight, floating=True)
        self.weight = weight
        self._backup: torch.Tensor | None = None
        self._version: int | None = None
        self.active = False

    def __repr__(self) -> str:
        w = self.weight
        return (f"ExactPerturbation(weight=<{tuple(w.shape)} {w.dtype} on {w.device}>, active={self.active}, "
                f"nbytes={self.nbytes})")

    @property
    def nbytes(self) -> int:
        """Memory held for the exact restore (0 until the first apply, or after release())."""
        return 0 if self._backup is None else self._backup.numel() * self._backup.element_size()

    def apply(self, direction: torch.Tensor, *, scale: float) -> torch.Tensor:
        """Perturb the weight in place: ``W <- W_saved + scale * direction / ||direction||``.

        A zero direction gives a zero perturbation (never NaN).

        Args:
            direction: a floating-point tensor of the weight's shape, on its device.
            scale: the global L2 norm of the perturbation.

        Returns:
            The weight (perturbed).

        Raises:
            TypeError: ``direction`` not a floating-point tensor, or ``scale`` not a real number.
            ValueError: ``direction`` on another device or of another shape; a non-finite ``scale``.
            RuntimeError: the weight was written in place since the previous ``apply``.
        """
        w = self.weight
        _checks.tensor("direction", direction, floating=True)
        _checks.same_device("direction", direction, "weight", w)
        _checks.same_shape("direction", direction, "weight", w)
        scale = _checks.finite_number("scale", scale)
        if self.active:
            self._check_untouched("apply")
        with torch.no_grad():
            if not self.active:
                if self._backup is None or self._backup.device != w.device:
                    self._backup = torch.empty_like(w, memory_format=torch.contiguous_format)
                self._backup.copy_(w)
            dt = ref.acc_dtype(direction.dtype)
            d = direction.detach()
            norm = ref.group_norm(d, "global").reshape(())
            factor = torch.where(norm > 0, scale / norm.clamp_min(torch.finfo(dt).tiny), torch.zeros_like(norm))
            if d.dtype != w.dtype:
                d = d.to(w.dtype)
            # one fused pass, computed in the accumulation dtype and rounded once into W
            torch.addcmul(cast(torch.Tensor, self._backup), d, factor, out=w)
        self._version = _torch_internals.version_counter(w)
        self.active = True
        return w

    def restore(self, *, force: bool = False) -> torch.Tensor:
        """Put the weight back bit-exactly as it was before the first ``apply``.

        Args:
            force: restore even if the weight was written in place since ``apply``.

        Returns:
            The weight (restored).

        Raises:
            RuntimeError: no perturbation is applied, or (without ``force``) the weight was written in
                place since ``apply``.
            TypeError: ``force`` is not a bool.
        """
        force = _checks.flag("force", force)
        if not self.active:
            raise RuntimeError("ExactPerturbation.restore() called with no perturbation applied")
        if not force:
            self._check_untouched("restore")
        assert self._backup is not None  # set by apply, which made the perturbation active
        with torch.no_grad():
            self.weight.copy_(self._backup)
        self.active = False
        self._version = None
        return self.weight

    def release(self) -> None:
        """Free the saved copy (restores first if a perturbation is active).

        Raises:
            RuntimeError: as ``restore`` (the weight was written in place while perturbed).
        """
        if self.active:
            self.restore()
        self._backup = None

    @contextlib.contextmanager
    def perturbed(self, direction: torch.Tensor, *, scale: float) -> Iterator[torch.Tensor]:
        """``apply`` on entry, ``restore`` on exit; if the body raises, the weight is restored anyway.

        Args:
            direction, scale: as for ``apply``.

        Returns:
            A context manager that yields the (perturbed) weight.

        Raises:
            As ``apply`` on entry and ``restore`` on exit.
        """
        self.apply(direction, scale=scale)
        try:
            yield self.weight
        except BaseException:
            if self.active:
                self.restore(force=True)
            raise
        if self.active:
            self.restore()

    def _check_untouched(self, what):
        if _torch_internals.version_counter(self.weight) != self._version:
            raise RuntimeError(
                f"ExactPerturbation.{what}(): weight was written in place while perturbed (an optimizer step "
                "before restore(), or a max_norm embedding?); restoring would discard that write. Restore "
                "before optimizer.step(), or pass force=True to restore anyway"
            )


@contextlib.contextmanager
def perturbed_(weight: torch.Tensor, direction: torch.Tensor, *, scale: float) -> Iterator[torch.Tensor]:
    """One-off ``with fastvat.inplace.perturbed_(W, d, scale=eps): ...``: W is perturbed in place
    inside the block and bit-identical after it. Allocates the V·H backup for each use; in a loop,
    keep an ``ExactPerturbation`` and use its ``perturbed`` method instead.

    Args:
        weight: the floating-point tensor to perturb in place.
        direction, scale: as for ``ExactPerturbation.apply``.

    Returns:
        A context manager that yields the (perturbed) weight.

    Raises:
        As ``ExactPerturbation`` and its ``apply``/``restore``.
    """
    p = ExactPerturbation(weight)
    with p.perturbed(direction, scale=scale):
        yield weight
