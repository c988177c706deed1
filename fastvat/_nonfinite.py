"""What a NaN/Inf does in a call (``nonfinite=`` of every regularizer; docs/reliability.md, "NaN and Inf").

"raise" (default): a FloatingPointError naming where the value first appeared, after one host check
per call (a device sync on a GPU); the call then unwinds and restores the model like any error.
"zero": a non-finite perturbation direction becomes a zero perturbation for that call, a non-finite
loss a zero loss, each with a RuntimeWarning. "ignore": no check and no host sync (CUDA graph capture,
or a training loop that checks the loss itself).
"""
from __future__ import annotations

import warnings

import torch

MODES = ("raise", "zero", "ignore")

# Where a value came from, as the messages name it (shared so every regularizer says it the same way).
CLEAN = "the clean logits (the model's output at the unperturbed input)"
GIVEN = "the logits passed as logits="


def bad_logits(z, row_mask=None):
    """A 0-dim bool tensor (no host sync): a row of z holds NaN or +Inf, or is all -Inf (no
    distribution). A single -Inf is a masked class, probability 0: allowed. Rows where ``row_mask``
    (over z's leading dims, e.g. an attention mask) is 0 are padding and never count."""
    if z.dim() == 0 or z.numel() == 0:
        return (torch.isnan(z) | torch.isposinf(z)).any()
    bad = (torch.isnan(z) | torch.isposinf(z)).any(-1) | torch.isneginf(z).all(-1)
    if row_mask is not None:
        bad = bad & (row_mask.reshape(bad.shape) != 0)
    return bad.any()


def finite(t):
    """A 0-dim bool tensor (no host sync): every entry of t (a tensor or a number) is finite."""
    return torch.isfinite(torch.as_tensor(t).detach()).all()


def all_true(flags):
    """A 0-dim bool tensor: every one of the 0-dim bool tensors in ``flags`` is true (no host sync)."""
    ok = flags[0]
    for f in flags[1:]:
        ok = ok & f.to(ok.device)
    return ok


def first_bad(checks):
    """The first ``where`` of ``[(where, ok, ...), ...]`` whose ``ok`` is false, or None (failure path only)."""
    for where, ok, *_ in checks:
        if not bool(ok):
            return where
    return None


def warn_zero_perturbation(name, where, *, stacklevel=2):
    warnings.warn(
        f"{name}: non-finite value (NaN or Inf) in {where}; using a zero perturbation for this call "
        "(nonfinite='zero')",
        RuntimeWarning, stacklevel=stacklevel + 1,
    )


def zero_direction(name, d, where, *, warn=True, stacklevel=2):
    """nonfinite="zero": a direction holding NaN/Inf becomes zeros (a zero perturbation), with a
    RuntimeWarning unless ``warn`` is false (or a callable returning false: asked on failure only)."""
    if d is None or bool(finite(d)):
        return d
    if warn() if callable(warn) else warn:
        warn_zero_perturbation(name, where, stacklevel=stacklevel + 1)
    return torch.zeros_like(d)


def checked_loss(name, mode, loss, ok, where, *, stacklevel=2):
    """The call's one host check: ``loss`` and ``ok`` (a 0-dim bool tensor for everything else that
    must be finite, or None). On failure ``where()`` names the first non-finite place; then raise
    (``mode="raise"``) or return a zero loss with a warning (``"zero"``). ``"ignore"``: no check."""
    if mode == "ignore":
        return loss
    good = finite(loss)
    if ok is not None:
        good = good & ok.to(good.device)
    if bool(good):
        return loss
    place = where()
    if mode == "raise":
        t = torch.as_tensor(loss).detach()
        value = float(t) if t.numel() == 1 else f"a tensor of shape {tuple(t.shape)}"
        raise FloatingPointError(
            f"{name}: non-finite value (NaN or Inf) in {place} (the loss is {value}); "
            "pass nonfinite='zero' to skip such calls with a warning"
        )
    warnings.warn(f"{name}: non-finite value (NaN or Inf) in {place}; returning a zero loss for this call "
                  "(nonfinite='zero')", RuntimeWarning, stacklevel=stacklevel + 1)
    zero = torch.zeros_like(torch.as_tensor(loss).detach())
    # a leaf that requires grad, so that `loss.backward()` on it alone still works (no parameter
    # receives a gradient from it)
    return zero.requires_grad_() if zero.is_floating_point() and torch.is_grad_enabled() else zero
