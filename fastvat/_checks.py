"""Argument validation shared by the ops and the user API.

Every check raises before any state is touched, and every message names the argument.
"""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name, value, *, floating=False, integer=False):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {value.dtype}"
        )
    if integer and value.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor of indices, got {value.dtype}")
    return value


def choice(name, value, allowed):
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")
    return value


def flag(name, value):
    """A bool argument: ``True`` or ``False`` only (a string such as ``"no"`` is truthy, so it is refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def finite_number(name, value, *, positive=False, nonnegative=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            raise TypeError(f"{name} must be a Python number, not a tensor (use float({name}))")
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def nonnegative_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def optional_dim(name, value):
    """None or an int naming a dim (its range is checked against the tensor it indexes)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise TypeError(f"{name} must be an int (the index of a dim) or None, got {type(value).__name__}")
    return None if value is None else int(value)


def class_dim(value):
    """None or the index of the logits' class dim, which cannot be dim 0: that is the batch."""
    value = optional_dim("class_dim", value)
    if value == 0:
        raise ValueError(
            "class_dim=0 names the batch dim of the logits; the classes lie in another dim (class_dim=1 "
            "for [N, C, L] or [N, C, H, W] logits, the default (the last dim) for [B, C] and [B, T, C])"
        )
    return value


def same_device(name, value, ref_name, ref):
    if value.device != ref.device:
        raise ValueError(f"{name} is on {value.device} but {ref_name} is on {ref.device}; move them to one device")


def same_shape(name, value, ref_name, ref):
    if value.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(value.shape)} but {ref_name} has shape {tuple(ref.shape)}")


def leading_mask(mask, x, *, name="mask", x_name="x"):
    """Validate a mask over the leading dims of x; return it as an x.dtype tensor of shape x.shape[:k].

    The mask may be bool or 0/1 numbers; it must broadcast to a prefix of x's shape.
    """
    tensor(name, mask)
    same_device(name, mask, x_name, x)
    if mask.dim() > x.dim():
        raise ValueError(
            f"{name} has {mask.dim()} dims but {x_name} has {x.dim()}; it must cover leading dims of {x_name}"
        )
    prefix = tuple(x.shape[: mask.dim()])
    try:
        expanded = mask.expand(prefix)
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {tuple(mask.shape)} does not broadcast to the leading dims {prefix} of {x_name}"
        ) from None
    if mask.dtype == torch.bool:
        return expanded.to(x.dtype).contiguous()
    if not (mask.dtype.is_floating_point or mask.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
        raise TypeError(f"{name} must be bool or 0/1 numbers, got {mask.dtype}")
    return expanded.to(x.dtype).contiguous()


def row_mask(mask, x, *, x_name, feature):
    """A mask over the first k leading (non-``feature``) dims of the tensor argument ``x_name``,
    validated and expanded to all of them: each of its entries covers every row below it.

    Row weights, so kept in the dtype the rows are accumulated in (float32, float64 for float64 x),
    not rounded to x's (0.3 would be 0.30078 in bfloat16). Entries must be finite and >= 0: one host
    read of the mask, skipped while tracing (torch.compile) where it cannot be read."""
    tensor("mask", mask)
    lead = tuple(x.shape[:-1])
    if mask.dim() > len(lead):
        raise ValueError(f"mask has {mask.dim()} dims but {x_name} has {len(lead)} leading (non-{feature}) dims")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    probe = torch.empty(lead + (1,), device=x.device, dtype=acc)
    if (mask.dtype != torch.bool and not mask.dtype.is_complex and mask.numel() > 0 and mask.device.type != "meta"
            and not torch.compiler.is_compiling()):
        wrong = mask < 0
        if mask.dtype.is_floating_point:
            wrong = wrong | ~torch.isfinite(mask)
        if bool(wrong.any()):
            bad = mask[wrong].reshape(-1)[0].item()
            raise ValueError(f"mask entries must be finite and >= 0 (row weights), got {bad}")
    mask = leading_mask(mask, probe, x_name=f"{x_name}'s leading dims")
    return mask.reshape(tuple(mask.shape) + (1,) * (len(lead) - mask.dim())).expand(lead)


def not_grad_leaf(name, t):
    if t.is_leaf and t.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{name} is a leaf tensor that requires grad; an in-place update on it would break autograd "
            f"(wrap the call in torch.no_grad())"
        )


def index_range(name, idx, size, what):
    """Every value of the integer tensor idx lies in [0, size). Reads the values (a host sync on a
    GPU), so callers use it on the CPU, or where they synchronise anyway."""
    if idx.numel() == 0:
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= size:
        raise ValueError(f"{name} must lie in [0, {size}) ({what}), got values in [{lo}, {hi}]")


def _byte_span(t):
    """[first, last) byte address of t's elements (PyTorch strides are never negative)."""
    extent = sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
    return t.data_ptr(), t.data_ptr() + extent * t.element_size()


def _strides(t):
    """t's strides where they matter: a dim of size 1 may carry any stride."""
    return tuple(s for n, s in zip(t.shape, t.stride()) if n != 1)


def _bytes_of(t, marks, base):
    """t's bytes as a strided view of ``marks``, a uint8 tensor whose element 0 is address ``base``."""
    size = t.element_size()
    return marks.as_strided(tuple(t.shape) + (size,), tuple(s * size for s in t.stride()) + (1,), t.data_ptr() - base)


def memory_overlap(a, b):
    """How the memory of tensors a and b (on one device) relates: ``"none"``, ``"same"`` (the very same
    elements in the same layout: full aliasing) or ``"partial"`` (they share some byte otherwise).

    Views that interleave without sharing an element (``buf[::2]`` and ``buf[1::2]``) are ``"none"``;
    telling them apart from a real overlap marks a's bytes in a scratch buffer, which only happens
    when the two byte spans intersect and the views differ.
    """
    if a.numel() == 0 or b.numel() == 0 or a.device.type == "meta" or torch.compiler.is_compiling():
        return "none"
    (a0, a1), (b0, b1) = _byte_span(a), _byte_span(b)
    if a1 <= b0 or b1 <= a0:
        return "none"
    if a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape and _strides(a) == _strides(b):
        return "same"
    lo = min(a0, b0)
    marks = torch.zeros(max(a1, b1) - lo, dtype=torch.uint8, device=a.device)
    _bytes_of(a, marks, lo).fill_(1)
    return "partial" if bool(_bytes_of(b, marks, lo).any()) else "none"
