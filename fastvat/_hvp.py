"""The exact (xi -> 0) power step of VAT: a Gauss–Newton Hessian-vector product without cancellation.

The finite-difference power step ``d <- grad_d D(p, f(x + xi d))`` needs ``x + xi d`` to differ
from ``x`` in the precision the model computes in. With the VAT paper's ``xi = 1e-6`` and fp16 /
bf16 (autocast or half weights) it does not: ``q == p`` bitwise and the direction is zero.

The step it approximates has a closed form. At r = 0 the Hessian of ``D(p, softmax(f(x + r)))``
w.r.t. r is ``J^T (diag(q) - q q^T) J + sum_k (q - p)_k grad^2 f_k`` with ``J = df/dr`` and
``q = softmax(f(x))``; the second term vanishes when p is the clean prediction (q == p), and the
first (Gauss–Newton / Fisher) term is what the power iteration converges on. So

    H d = J^T [q * (J d - <q, J d>)]

is one forward pass carrying the tangent d (forward-mode AD: ``J d`` with no subtraction, so no
cancellation in low precision) plus one backward pass (the vjp with ``J^T``). Every scale in it is
global, so the per-group normalisation that follows is unaffected by the rescalings done here to
keep fp16 away from underflow.

Used by ``fastvat.VAT(hvp=...)``:
  ``"finite_difference"`` the paper's / article's step (xi matters);
  ``"exact"``             this module (xi is not used);
  ``"auto"`` (default)    exact when the step would run in fp16/bf16 (autocast on the perturbed
                          tensor's device, or half-precision tensors), finite difference otherwise
                          — so float32/float64 training is unchanged.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from fastvat import reference as ref
from fastvat._model_io import extract_logits
from fastvat._targets import InputTarget, OutputTarget, WeightTarget

MODES = ("auto", "finite_difference", "exact")
_HALF = (torch.float16, torch.bfloat16)


class FallBack(Exception):
    """Raised in ``hvp="auto"`` when the model cannot run forward-mode AD; VAT then uses finite differences."""


def _autocast_dtype(device_type):
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError, RuntimeError):  # pragma: no cover - torch < 2.4
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        if device_type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        return None


def compute_dtype(reg, args):
    """The dtype the power step's arithmetic runs in: the autocast dtype, else the tensors' own."""
    t = reg._target
    if isinstance(t, InputTarget):
        like = args[0] if args and isinstance(args[0], torch.Tensor) else None
    else:
        like = t.module.weight
    if like is None:
        return None
    ad = _autocast_dtype(like.device.type)
    if ad in _HALF:
        return ad
    if like.dtype in _HALF:
        return like.dtype
    for p in reg.model.parameters():
        if p.is_floating_point():
            return p.dtype
    return like.dtype


def use_exact(reg, args) -> bool:
    mode = reg.hvp
    if mode == "exact":
        return True
    if mode == "finite_difference" or getattr(reg, "_hvp_unsupported", False):
        return False
    return compute_dtype(reg, args) in _HALF


@contextlib.contextmanager
def _math_attention():
    """The fused attention kernels have no forward-mode AD; the math one is plain matmuls and softmax."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _dual(unit, box):
    """A zero perturbation that carries ``unit`` as its tangent and is a leaf for the vjp."""
    n = unit.numel()
    scale = 1.0
    if n:
        # Rescale globally so that tangent elements are O(1) (fp16 has a narrow range).
        rms = unit.detach().to(ref.acc_dtype(unit.dtype)).norm() / (n ** 0.5)
        scale = torch.where(rms > 0, 1.0 / rms.clamp_min(torch.finfo(rms.dtype).tiny), torch.ones_like(rms))
    z0 = torch.zeros_like(unit, requires_grad=True)
    box["z0"] = z0
    with warnings.catch_warnings():
        # The first make_dual of a process loads PyTorch's jvp decompositions, which call the
        # deprecated torch.jit.script (a one-time deprecation warning that is not the user's concern).
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
        return fwAD.make_dual(z0, (unit * scale).to(unit.dtype))


@contextlib.contextmanager
def _linearised(t, box):
    """Install ``r = dual(0, d_unit)`` where the target would add its perturbation."""
    if isinstance(t, OutputTarget):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor) or not output.is_floating_point():
                raise TypeError(f"the embedding's output must be a floating-point tensor, got {type(output).__name__}")
            if t.mask is None and t._attention_mask is not None:
                t.mask = t._mask_for(output)
            unit = t.realise_for(tuple(output.shape), output.detach())
            return output + _dual(unit, box)
    elif isinstance(t, WeightTarget):
        def hook(module, inputs, output):
            t._capture(inputs[0])
            unit = t._r_rows()
            return output + F.embedding(t.inverse, _dual(unit, box))
    else:
        yield
        return
    handle = t.module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _is_forward_ad_gap(exc):
    msg = str(exc)
    return "forward AD" in msg or "forward-mode" in msg or "forward mode" in msg or "jvp" in msg


def exact_step(reg, args, kwargs, d):
    """One power step ``d <- H d`` (the xi -> 0 limit), H the Gauss–Newton Hessian of D at r = 0.

    d is None for the random start (drawn exactly as the finite-difference path draws it). Returns
    a tensor shaped like the perturbation (what ``grad_r D`` would be), up to a global scale.
    """
    t = reg._target
    if d is None:
        reg._start(1.0)
    else:
        t.direction(d, 1.0)
    box = {}
    try:
        with torch.enable_grad(), _math_attention(), fwAD.dual_level():
            with _linearised(t, box):
                call_args = args
                if isinstance(t, InputTarget):
                    x = args[0]
                    unit = t.realise_for(tuple(x.shape), x.detach())
                    call_args = (x + _dual(unit, box),) + tuple(args[1:])
                out = reg.model(*call_args, **kwargs)
            primal, tangent = fwAD.unpack_dual(reg._class_last(extract_logits(out)))
            with torch.no_grad():
                dt = ref.acc_dtype(primal.dtype)
                q = torch.softmax(primal.detach().to(dt), dim=-1)
                if tangent is None:
                    w = torch.zeros_like(q)
                else:
                    jd = tangent.detach().to(dt)
                    w = q * (jd - (q * jd).sum(-1, keepdim=True))
                mask = t.row_mask_for(primal)
                if mask is not None:
                    w = w * mask.to(dt).reshape(tuple(mask.shape) + (1,))
                w = w / w.abs().amax().clamp_min(torch.finfo(dt).tiny) if w.numel() else w
    except (NotImplementedError, RuntimeError) as exc:
        if not _is_forward_ad_gap(exc):
            raise
        if reg.hvp == "exact":
            raise RuntimeError(
                "fastvat.VAT(hvp='exact') needs forward-mode AD through the model, and an op in it has none "
                f"({exc}). Use hvp='finite_difference' with a larger xi, or run the model in float32."
            ) from exc
        reg._hvp_unsupported = True
        warnings.warn(
            "fastvat.VAT: the model does not support forward-mode AD, so the exact low-precision power step is "
            f"unavailable ({str(exc).splitlines()[0]}); falling back to finite differences, which need xi to be "
            "large next to the perturbed tensor in fp16/bf16.",
            RuntimeWarning,
            stacklevel=3,
        )
        raise FallBack() from exc
    z0 = box.get("z0")
    if z0 is None:
        t.check_reached()
        raise RuntimeError(
            f"the model's forward never reached the {t.name} target; fastvat cannot perturb it"
        )
    if not primal.requires_grad:
        return torch.zeros_like(z0)
    (hd,) = torch.autograd.grad(primal, z0, grad_outputs=w.to(primal.dtype), allow_unused=True)
    return torch.zeros_like(z0) if hd is None else hd
