"""Where a perturbation r lives and how it enters the model's forward pass.

Three targets:
  InputTarget   — added to the first positional argument of the model call;
  OutputTarget  — added to an nn.Embedding's output by a forward hook;
  WeightTarget  — added to the rows of an nn.Embedding's weight that the batch uses, out of
                  place (the weight is never written), with the chi-square treatment of the
                  rows outside the batch so the random start matches the dense algorithm.

r is realised lazily, when the forward pass reaches the target (its shape is known only then),
from a spec set by the regularizer: a random start, a direction to normalise, raw Gaussian
noise, zeros, or an explicit value. The realised tensor is ``target.current``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn
import torch.nn.functional as F

from fastvat import _checks, ops
from fastvat import reference as ref
from fastvat._defaults import DEFAULTS


def chi2_sample(dof: int, *, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """One draw of chi-square(dof): exact sum of squares for small dof, Wilson–Hilferty above.

    Wilson–Hilferty's cube-of-normal approximation has relative error far below 1e-6 in the
    distribution for dof in the millions (the V·H of a vocabulary matrix), and takes the generator.
    """
    if dof <= 0:
        return torch.zeros((), device=device, dtype=dtype)
    if dof <= 4096:
        z = torch.randn(dof, generator=generator, device=device, dtype=torch.float64)
        return (z * z).sum().to(dtype)
    z = torch.randn((), generator=generator, device=device, dtype=torch.float64)
    c = 2.0 / (9.0 * dof)
    return (dof * (1.0 - c + z * math.sqrt(c)).clamp_min(0) ** 3).to(dtype)


class _Spec:
    __slots__ = ("kind", "value", "scale", "requires_grad")

    def __init__(self, kind, value=None, scale=1.0, requires_grad=False):
        self.kind, self.value, self.scale, self.requires_grad = kind, value, scale, requires_grad


class Target:
    """Base: the spec → tensor logic shared by every target."""

    name = ""
    # the norm names are validated here, once, against the table of defaults (fastvat/_defaults.py)
    allowed_norms: tuple[str, ...] = ref.NORMS

    def __init__(self, norm: str, generator=None):
        _checks.choice("norm", norm, self.allowed_norms)
        self.norm = norm
        self.generator = generator
        self.mask = None  # float mask over leading dims of r, or None
        self._spec = None
        self.current: Any = None  # the realised r (a tensor) once the forward reaches the target

    # -- the spec -------------------------------------------------------------------------
    def random(self, scale, *, requires_grad=False):
        """Gaussian direction normalised to `scale` per norm group (the random start)."""
        self._set(_Spec("random", scale=scale, requires_grad=requires_grad))

    def direction(self, d, scale, *, requires_grad=False):
        """`d` normalised to `scale` per norm group."""
        self._set(_Spec("direction", d.detach(), scale, requires_grad))

    def gaussian(self, sigma, *, requires_grad=False):
        """Raw N(0, sigma²) noise, no normalisation."""
        self._set(_Spec("gaussian", scale=sigma, requires_grad=requires_grad))

    def zeros(self, *, requires_grad=True):
        self._set(_Spec("zeros", requires_grad=requires_grad))

    def value(self, r, *, requires_grad=False):
        self._set(_Spec("value", r.detach(), requires_grad=requires_grad))


    def _set(self, spec):
        self._spec = spec
        self.current = None

    # -- realising it -----------------------------------------------------------------------
    def _randn(self, shape, like):
        dt = ref.acc_dtype(like.dtype)
        return torch.randn(shape, generator=self.generator, device=like.device, dtype=dt)

    def _normalise(self, d, scale, like, extra_sumsq=None):
        if extra_sumsq is None:
            # normalised in the wider of d's and like's dtypes, then rounded once to like's (the
            # dtype r is added in): a float32 direction is not rounded to bf16 before its norm
            wide = torch.promote_types(d.dtype, like.dtype)
            r = ops.l2_normalize(d if d.dtype == wide else d.to(wide), scale=scale, norm=self.norm, mask=self.mask)
            return r if r.dtype == like.dtype else r.to(like.dtype)
        # Global norm that also counts the mass of rows outside the batch (weight target).
        dt = ref.acc_dtype(d.dtype)
        d = d.to(dt)
        n = torch.hypot(ref.group_norm(d, "global"), extra_sumsq.to(dt).sqrt())
        return (d * torch.where(n > 0, scale / n.clamp_min(torch.finfo(dt).tiny), torch.zeros_like(n))).to(like.dtype)

    def _realise(self, shape, like, extra_dof=0):
        spec = self._spec
        if spec is None:
            raise RuntimeError("fastvat internal error: the perturbation was used before it was set")
        if spec.kind == "random":
            g = self._randn(shape, like)
            extra = None
            if extra_dof:
                extra = chi2_sample(extra_dof, generator=self.generator, device=like.device, dtype=g.dtype)
            r = self._normalise(g, spec.scale, like, extra)
        elif spec.kind == "direction":
            if tuple(spec.value.shape) != tuple(shape):
                raise RuntimeError(
                    f"the perturbed tensor changed shape between passes: {tuple(spec.value.shape)} then "
                    f"{tuple(shape)}; the model must see the same batch in every pass"
                )
            r = self._normalise(spec.value, spec.scale, like)
        elif spec.kind == "gaussian":
            r = (self._randn(shape, like) * spec.scale)
            if self.mask is not None:
                r = r * ref._mask_like(self.mask, r, r.dtype)
            r = r.to(like.dtype)
        elif spec.kind == "zeros":
            r = torch.zeros(shape, device=like.device, dtype=like.dtype)
        else:
            r = spec.value.to(like.dtype)
        if spec.requires_grad:
            r.requires_grad_(True)
        return r

    def realise_for(self, shape, like, extra_dof=0):
        if self.current is None:
            self.current = self._realise(shape, like, extra_dof)
        elif tuple(self.current.shape) != tuple(shape):
            raise RuntimeError(
                f"the {self.name} target was reached twice in one forward pass with different shapes "
                f"({tuple(self.current.shape)} and {tuple(shape)}); fastvat perturbs one tensor per pass"
            )
        return self.current

    # -- what subclasses provide ------------------------------------------------------------
    def prepare(self, args, kwargs):
        """Validate the call and pick up the padding mask; returns (args, kwargs) for the model."""
        return args, kwargs

    @contextlib.contextmanager
    def installed(self):
        yield

    @contextlib.contextmanager
    def clean_pass(self):
        """Around the unperturbed pass: lets a target validate what reaches it (nothing by default)."""
        yield

    def check_reached(self):
        """After a perturbed pass: the forward must have reached the target."""
        if self.current is None and self._spec is not None:
            module = getattr(self, "module", None)
            raise ValueError(
                f"the model's forward never called the embedding passed as embedding= ({module!r}), so there "
                "was nothing to perturb; pass the nn.Embedding that the model's forward uses"
            )

    def apply_to_args(self, args):
        return args

    @contextlib.contextmanager
    def linearised(self, args, make_dual):
        """For one forward-mode pass: r = ``make_dual(unit)`` (zero, with the current direction as its
        tangent) where the target adds r; yields the arguments to call the model with."""
        raise NotImplementedError
        yield

    def perturbed_like(self, args):
        """The tensor r is added to (its dtype and device decide the power step's precision), or None."""
        return None

    def dense(self, r):
        """The perturbation shaped like the tensor it perturbs."""
        return r

    def row_mask_for(self, logits):
        """A mask over the logits' rows (token-level models), or None."""
        return None

    def begin_call(self):
        self._spec = None
        self.current = None
        self.mask = None

    def end_call(self):
        self._spec = None
        self.current = None


class InputTarget(Target):
    name = "input"
    allowed_norms = DEFAULTS["input"]["norms"]

    def prepare(self, args, kwargs):
        if not args:
            raise ValueError("target 'input' perturbs the first positional argument of the call, but none was given")
        x = args[0]
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(
                "target 'input' needs a floating-point tensor as the first positional argument "
                f"(got {type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}); for token ids, "
                "pass embedding=model's nn.Embedding"
            )
        if self.norm == "sample" and x.dim() == 0:
            raise ValueError("norm 'sample' needs an input with a batch dim")
        return args, kwargs

    def apply_to_args(self, args):
        x = args[0]
        r = self.realise_for(tuple(x.shape), x.detach())
        return (x + r,) + tuple(args[1:])

    @contextlib.contextmanager
    def linearised(self, args, make_dual):
        x = args[0]
        unit = self.realise_for(tuple(x.shape), x.detach())
        yield (x + make_dual(unit),) + tuple(args[1:])

    def perturbed_like(self, args):
        return args[0] if args and isinstance(args[0], torch.Tensor) else None


class _EmbeddingTarget(Target):
    def __init__(self, module: nn.Embedding, norm: str, generator=None):
        super().__init__(norm, generator)
        self.module = module
        self._attention_mask = None

    def prepare(self, args, kwargs):
        am = kwargs.get("attention_mask")
        self._attention_mask = am if isinstance(am, torch.Tensor) else None
        return args, kwargs

    @contextlib.contextmanager
    def _forward_or_hook(self, forward, patch):
        """For one pass: `forward` set on the embedding instance when `patch`, else self._hook."""
        m = self.module
        if patch:
            m.forward = forward
            try:
                yield
            finally:
                del m.forward
        else:
            handle = m.register_forward_hook(self._hook)
            try:
                yield
            finally:
                handle.remove()

    def perturbed_like(self, args):
        return self.module.weight

    @contextlib.contextmanager
    def linearised(self, args, make_dual):
        handle = self.module.register_forward_hook(lambda module, inputs, output: self._dual_hook(inputs, output,
                                                                                               make_dual))
        try:
            yield args
        finally:
            handle.remove()

    def row_mask_for(self, logits):
        am = self._attention_mask
        if am is not None and logits.dim() >= 2 and tuple(am.shape) == tuple(logits.shape[:-1]):
            return am
        return None


class OutputTarget(_EmbeddingTarget):
    name = "output"
    allowed_norms = DEFAULTS["output"]["norms"]

    def _mask_for(self, out):
        am = self._attention_mask
        if am is None:
            return None
        if tuple(am.shape) != tuple(out.shape[: am.dim()]):
            raise ValueError(
                f"attention_mask of shape {tuple(am.shape)} does not match the leading dims of the embedding "
                f"output {tuple(out.shape)}; pass a mask over the embedded positions"
            )
        return _checks.leading_mask(am, out, name="attention_mask", x_name="the embedding output")

    def _r_for(self, output):
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            raise TypeError(f"the embedding's output must be a floating-point tensor, got {type(output).__name__}")
        if self.mask is None and self._attention_mask is not None:
            self.mask = self._mask_for(output)
        return self.realise_for(tuple(output.shape), output.detach())

    def _hook(self, module, inputs, output):
        return output + self._r_for(output)

    def _dual_hook(self, inputs, output, make_dual):
        return output + make_dual(self._r_for(output))

    def _patched_forward(self, *args, **kwargs):
        m = self.module
        return self._hook(m, args, type(m).forward(m, *args, **kwargs))

    @contextlib.contextmanager
    def installed(self):
        # r is added by an instance-level forward rather than a forward hook: torch.compile guards
        # on a module's forward but, by default, not on hooks added after the first compiled call.
        # An embedding whose forward is already patched on the instance keeps it and gets a hook.
        with self._forward_or_hook(self._patched_forward, "forward" not in self.module.__dict__):
            yield


class WeightTarget(_EmbeddingTarget):
    """The article's target, out of place: r lives on the U rows the batch uses ([U, H])."""

    name = "weight"
    allowed_norms = DEFAULTS["weight"]["norms"]

    def begin_call(self):
        super().begin_call()
        self.ids = None
        self.rows = None
        self.inverse = None

    def _capture(self, ids):
        if self.ids is None:
            if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
                what = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
                raise TypeError(f"the embedding's input must be integer token ids, got {what}")
            v = self.module.num_embeddings
            if ids.numel():
                lo, hi = int(ids.min()), int(ids.max())
                if lo < 0 or hi >= v:
                    raise ValueError(
                        f"token ids must lie in [0, {v}) for the embedding ({v} rows), got values in [{lo}, {hi}]"
                    )
            self.ids = ids
            self.rows, self.inverse = torch.unique(ids, sorted=True, return_inverse=True)
        elif self.ids.shape != ids.shape:
            raise RuntimeError("the embedding saw token ids of another shape in a later pass of the same call")

    def _r_rows(self, like=None):
        """r on the batch's rows, in the dtype and on the device of ``like`` (default: the weight).

        Hooks pass the embedding's output: after an FSDP unit's forward the weight is a shard again,
        whose dtype and device need not be those the forward computed in."""
        like = self.module.weight.detach() if like is None else like.detach()
        u, h = self.rows.numel(), self.module.embedding_dim
        extra_dof = (self.module.num_embeddings - u) * h if self.norm == "global" else 0
        return self.realise_for((u, h), like, extra_dof=extra_dof)

    def _fused_forward(self, ids):
        self._capture(ids)
        r = self._r_rows()
        return ops.embedding_gather_add(
            self.module.weight, ids, r, self.inverse, padding_idx=self.module.padding_idx
        )

    def _hook(self, module, inputs, output):
        self._capture(inputs[0])
        r = self._r_rows(output)
        return output + F.embedding(self.inverse, r)

    def _dual_hook(self, inputs, output, make_dual):
        self._capture(inputs[0])
        return output + F.embedding(self.inverse, make_dual(self._r_rows(output)))

    def _capture_hook(self, module, inputs):
        if inputs:
            self._capture(inputs[0])

    @contextlib.contextmanager
    def clean_pass(self):
        # Validate (and capture) the token ids before nn.Embedding sees them: an id out of range
        # gets an error that says so, instead of the embedding's IndexError (or a device assert).
        handle = self.module.register_forward_pre_hook(self._capture_hook)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def installed(self):
        m = self.module
        # A plain nn.Embedding is replaced by one fused gather-and-add; subclasses (which may
        # rescale or otherwise change their output) keep their forward and get r added after it,
        # and so does an embedding whose forward is already patched on the instance (by the user,
        # or by another fastvat call running around this one): that patch is left untouched.
        plain = (type(m) is nn.Embedding and m.max_norm is None and not m.sparse
                 and "forward" not in m.__dict__)
        with self._forward_or_hook(self._fused_forward, plain):
            yield

    def dense(self, r):
        w = self.module.weight
        out = torch.zeros(w.shape, device=w.device, dtype=r.dtype)
        if self.rows is not None:
            out.index_copy_(0, self.rows, r.detach())
        return out
