"""``perturb_`` / ``restore_``: the article's in-place perturbation of an embedding matrix, undone exactly."""
from __future__ import annotations

import torch

from fastvat import _checks
from fastvat import reference as ref
from fastvat.ops._backend import HAVE_KERNELS, use_kernel


def perturb_(weight: torch.Tensor, direction: torch.Tensor, *, scale: float, previous: torch.Tensor | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """The article's in-place step on an embedding matrix.

    ``new = scale * direction / ||direction||`` (global norm), ``weight += new - previous``,
    returns ``new``. ``new`` is written over ``previous`` when it is given (so the loop reuses
    one buffer), else into ``out``, else into a fresh tensor. ``restore_(weight, new)`` undoes it.
    direction may be the very same memory as weight, previous or out (it is read in full first),
    and out the same as previous; any other sharing of memory between the arguments (views of one
    buffer that partly overlap, or previous/out being weight) is a ValueError.
    ``new`` is formed in ``torch.promote_types(weight.dtype, direction.dtype)`` and rounded once to
    weight's dtype, the dtype it is stored in: a direction narrower than the weight (bf16 for a float32
    weight) gives a perturbation of the weight's precision, not one rounded to the direction's.

    Returns:
        ``new``, the perturbation now added to ``weight`` (pass it to ``restore_``).

    Raises:
        TypeError: a non-floating-point tensor, or scale not a real number.
        ValueError: mismatched shapes or devices, a non-finite scale, partly shared memory, or a
            ``weight`` that is a leaf requiring grad with grad mode on.
    """
    _checks.tensor("weight", weight, floating=True)
    _checks.tensor("direction", direction, floating=True)
    scale = _checks.finite_number("scale", scale)
    _checks.same_device("direction", direction, "weight", weight)
    _checks.same_shape("direction", direction, "weight", weight)
    for name, buf in (("previous", previous), ("out", out)):
        if buf is not None:
            _checks.tensor(name, buf, floating=True)
            _checks.same_device(name, buf, "weight", weight)
            _checks.same_shape(name, buf, "weight", weight)
            if buf.dtype != weight.dtype:
                raise TypeError(f"{name} must have weight's dtype {weight.dtype}, got {buf.dtype}")
    _checks.not_grad_leaf("weight", weight)
    _check_perturb_overlap(weight=weight, direction=direction, previous=previous, out=out)
    wide = torch.promote_types(weight.dtype, direction.dtype)
    if direction.dtype != wide:
        # a copy, read before anything is written: the kernels normalise in the direction's dtype
        direction = direction.to(wide)
    if not use_kernel(weight):
        return ref.perturb_(weight, direction, scale, previous=previous, out=out)
    if previous is not None and out is not None and out is not previous:
        if _checks.memory_overlap(out, direction) != "none":
            direction = direction.clone()  # out receives previous before the kernel reads direction
        out.copy_(previous)
        delta = out
    elif previous is not None:
        delta = previous
    elif out is not None:
        delta = out
    else:
        delta = torch.empty_like(weight)
    if not delta.is_contiguous() or not weight.is_contiguous():
        # The kernel works on contiguous memory; write back through the views afterwards.
        w_c, d_c = weight.contiguous(), delta.contiguous()
        torch.ops.fastvat.perturb_(w_c, direction, d_c, scale, previous is not None)
        if w_c.data_ptr() != weight.data_ptr():
            weight.copy_(w_c)
        if d_c.data_ptr() != delta.data_ptr():
            delta.copy_(d_c)
        return delta
    torch.ops.fastvat.perturb_(weight, direction, delta, scale, previous is not None)
    return delta


# The pairs of perturb_'s arguments that may be one and the same memory. Every element is read
# before it is written, so direction may be anything; previous and out are then one buffer.
_SAME_MEMORY_ALLOWED = {("weight", "direction"), ("direction", "previous"), ("direction", "out"), ("previous", "out")}


def _check_perturb_overlap(**tensors):
    """Raise if two arguments share memory other than as allowed above: with partly overlapping
    views the result would depend on the order in which the kernel's threads write."""
    named = [(name, t) for name, t in tensors.items() if t is not None]
    for i, (a_name, a) in enumerate(named):
        for b_name, b in named[i + 1:]:
            how = _checks.memory_overlap(a, b)
            if how == "none" or (how == "same" and (a_name, b_name) in _SAME_MEMORY_ALLOWED):
                continue
            if how == "same":
                raise ValueError(
                    f"{a_name} and {b_name} are the same memory; {b_name} must be a separate buffer "
                    f"(it receives or holds the perturbation, which is added to {a_name})"
                )
            raise ValueError(
                f"{a_name} and {b_name} partially overlap (views of one buffer that share some elements); "
                "pass separate tensors, or the very same one where aliasing is allowed"
            )


def restore_(weight: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Undo ``perturb_``: ``weight -= previous`` (a plain in-place ``sub_``; exact up to one rounding of
    the weight's dtype — ``fastvat.inplace.ExactPerturbation`` restores bit-exactly).

    Returns:
        The weight.

    Raises:
        TypeError: a non-floating-point tensor.
        ValueError: mismatched shapes or devices, or a ``weight`` that is a leaf requiring grad.
    """
    _checks.tensor("weight", weight, floating=True)
    _checks.tensor("previous", previous, floating=True)
    _checks.same_device("previous", previous, "weight", weight)
    _checks.same_shape("previous", previous, "weight", weight)
    _checks.not_grad_leaf("weight", weight)
    return ref.restore_(weight, previous)


if HAVE_KERNELS:

    @torch.library.register_fake("fastvat::perturb_")
    def _perturb_fake(weight, direction, delta, scale, has_previous):
        torch._check(direction.shape == weight.shape, lambda: "direction must have weight's shape")
        torch._check(delta.shape == weight.shape, lambda: "delta must have weight's shape")
        return None
