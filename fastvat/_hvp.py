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

import warnings
import weakref

import torch
import torch.autograd.forward_ad as fwAD

from fastvat import _fsdp
from fastvat import reference as ref
from fastvat._model_io import _cuda_rng_states, extract_logits, math_attention

MODES = ("auto", "finite_difference", "exact")
_HALF = (torch.float16, torch.bfloat16)

# Models that have shown they lack forward-mode AD: hvp="auto" then stays on finite differences for
# them, whichever VAT (or VATLoss, or functional call) meets them next. A property of the model, so
# kept per model, weakly: a deleted model is freed and forgotten.
_NO_FORWARD_AD: weakref.WeakSet = weakref.WeakSet()


def lacks_forward_ad(model) -> bool:
    """Whether ``model`` has shown (in an earlier exact power step) that it has no forward-mode AD."""
    try:
        return model in _NO_FORWARD_AD
    except TypeError:  # an unhashable model cannot be remembered
        return False


def remember_no_forward_ad(model) -> None:
    try:
        _NO_FORWARD_AD.add(model)
    except TypeError:
        pass


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


def compute_dtype(model, like):
    """The dtype the power step's arithmetic runs in: the autocast dtype, else the tensors' own.

    ``like``: the tensor the perturbation is added to (or None when there is none yet)."""
    if like is None:
        return None
    # Under FSDP with CPU offload a shard's device is not where the forward runs, and a mixed-precision
    # policy computes in a dtype that neither the shards nor the inputs have.
    for device_type in sorted({like.device.type} | _fsdp.compute_device_types(model)):
        ad = _autocast_dtype(device_type)
        if ad in _HALF:
            return ad
    if like.dtype in _HALF:
        return like.dtype
    policy = _fsdp.param_dtypes(model) & set(_HALF)
    if policy:
        return min(policy, key=str)
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return like.dtype


def use_exact(mode, unavailable, model, like) -> bool:
    """Whether the power step is the exact one: forced, or ``"auto"`` in fp16/bf16 on a model that has
    not shown (``unavailable``) that it lacks forward-mode AD."""
    if mode == "exact":
        return True
    if mode == "finite_difference" or unavailable:
        return False
    return compute_dtype(model, like) in _HALF


def _dual(unit, box):
    """A zero perturbation that carries ``unit`` as its tangent and is a leaf for the vjp."""
    n = unit.numel()
    scale = 1.0
    if n:
        # Rescale globally so that tangent elements are O(1) (fp16 has a narrow range).
        rms = ref.group_norm(unit.detach(), "global").reshape(()) / (n ** 0.5)
        scale = torch.where(rms > 0, 1.0 / rms.clamp_min(torch.finfo(rms.dtype).tiny), torch.ones_like(rms))
    z0 = torch.zeros_like(unit, requires_grad=True)
    box["z0"] = z0
    with warnings.catch_warnings():
        # The first make_dual of a process loads PyTorch's jvp decompositions, which call the
        # deprecated torch.jit.script (a one-time deprecation warning that is not the user's concern).
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
        return fwAD.make_dual(z0, (unit * scale).to(unit.dtype))


def _is_forward_ad_gap(exc):
    msg = str(exc)
    return "forward AD" in msg or "forward-mode" in msg or "forward mode" in msg or "jvp" in msg


def _primal_pass(model, target, args, kwargs, class_last, rng):
    """The logits at r = 0 with autograd, r a zero leaf shaped like the jvp pass's.

    ``rng``: the global generators' states when the jvp pass reached the target; set again at the same
    point, so what follows the target (dropout) draws what it drew in the jvp pass, and the generators
    end where that pass left them."""
    box = {}

    def zero_leaf(unit):
        cpu, cuda = rng
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        box["z0"] = torch.zeros_like(unit, requires_grad=True)
        return box["z0"]

    with torch.enable_grad(), math_attention():
        with target.linearised(args, zero_leaf) as call_args:
            out = model(*call_args, **kwargs)
        return class_last(extract_logits(out)), box["z0"]


def exact_step(model, target, args, kwargs, d, *, start, class_last, strict, row_mask=None):
    """One power step ``d <- H d`` (the xi -> 0 limit), H the Gauss–Newton Hessian of D at r = 0.

    d is None for the first step, whose direction ``start()`` sets on the target (a random
    start, drawn as the finite-difference path draws it). ``class_last`` puts the logits' class
    dim last; ``row_mask`` (default: the target's) gives the logits' rows that count. Returns a
    tensor shaped like the perturbation (what ``grad_r D`` would be), up to a global scale. A model
    without forward-mode AD raises ``FallBack`` (a RuntimeError when ``strict``: the caller forced
    the exact step).
    """
    if d is None:
        start()
    else:
        target.direction(d, 1.0)
    box = {}

    # FSDP2 routes every grad-requiring module input through an autograd.Function whose forward-mode
    # rule fails while autograd records ("the jvp is not returning a view"): the jvp pass runs without
    # autograd and a second pass, replaying the RNG so dropout draws the same masks, gives the vjp.
    split = bool(_fsdp.fully_shard_units(model))

    def make_dual(unit):
        if split:
            box["rng"] = (torch.get_rng_state(), _cuda_rng_states())
        return _dual(unit, box)

    try:
        with (torch.no_grad() if split else torch.enable_grad()), math_attention(), fwAD.dual_level():
            with target.linearised(args, make_dual) as call_args:
                out = model(*call_args, **kwargs)
            primal, tangent = fwAD.unpack_dual(class_last(extract_logits(out)))
            with torch.no_grad():
                dt = ref.acc_dtype(primal.dtype)
                q = torch.softmax(primal.detach().to(dt), dim=-1)
                if tangent is None:
                    w = torch.zeros_like(q)
                else:
                    jd = tangent.detach().to(dt)
                    w = q * (jd - (q * jd).sum(-1, keepdim=True))
                mask = (row_mask or target.row_mask_for)(primal)
                if mask is not None:
                    w = w * mask.to(dt).reshape(tuple(mask.shape) + (1,))
                w = w / w.abs().amax().clamp_min(torch.finfo(dt).tiny) if w.numel() else w
    except (NotImplementedError, RuntimeError) as exc:
        if not _is_forward_ad_gap(exc):
            raise
        if strict:
            raise RuntimeError(
                "fastvat.VAT(hvp='exact') needs forward-mode AD through the model, and an op in it has none "
                f"({exc}). Use hvp='finite_difference' with a larger xi, or run the model in float32."
            ) from exc
        raise FallBack(str(exc).splitlines()[0]) from exc
    z0 = box.get("z0")
    if z0 is None:
        target.check_reached()
        raise RuntimeError(
            f"the model's forward never reached the {target.name} target; fastvat cannot perturb it"
        )
    if split:
        primal, z0 = _primal_pass(model, target, args, kwargs, class_last, box["rng"])
    if not primal.requires_grad:
        return torch.zeros_like(z0)
    (hd,) = torch.autograd.grad(primal, z0, grad_outputs=w.to(primal.dtype), allow_unused=True)
    return torch.zeros_like(z0) if hd is None else hd
