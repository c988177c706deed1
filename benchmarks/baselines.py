"""VAT written from the math, without fastvat: the baselines fastvat is measured against.

- ``NaiveVAT`` — the common eager PyTorch VAT: its own clean forward always, a full
  ``loss.backward()`` in the power iteration (weight gradients included) read from the
  perturbation leaf's ``.grad`` followed by ``model.zero_grad()``, normalisation by separate ops
  ``d / (d.norm(dim=...) + 1e-8)``, ``F.kl_div(F.log_softmax(q), F.softmax(p), 'batchmean')``.
  Target: the model's input (``embedding=None``) or an ``nn.Embedding``'s output (forward hook).
  ``NaiveVAT(..., lean=True)`` is the same VAT written with care and no fused ops: the power step
  takes ``torch.autograd.grad`` with respect to r only (no weight gradients, no ``zero_grad``).
- ``DenseWeightVAT`` — the article's algorithm on an embedding matrix (bert4keras
  ``virtual_adversarial_training``): a dense [V, H] random start, ``weight.data += delta``, the
  gradient w.r.t. the full matrix, ``weight.data -= delta`` after the update.

Every call returns the VAT loss; ``DenseWeightVAT`` also needs ``restore()`` after the
optimizer step (it leaves the perturbation in the weight until then, as the article does).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastvat._model_io import extract_logits as logits_of


def kl_eager(p_logits, q_logits):
    """KL(softmax(p) || softmax(q)), batchmean, the usual way."""
    return F.kl_div(F.log_softmax(q_logits, dim=-1), F.softmax(p_logits, dim=-1), reduction="batchmean")


def normalize_per_sample(d):
    dims = tuple(range(1, d.dim()))
    return d / (d.norm(dim=dims, keepdim=True) + 1e-8)


def normalize_global(d):
    return d / (d.norm() + 1e-8)


class NaiveVAT:
    """Eager VAT as found in most PyTorch code (per-sample norm, full backward, zero_grad); with
    ``lean=True`` the power step differentiates with respect to r only (``torch.autograd.grad``)."""

    def __init__(self, model, embedding=None, *, xi=1e-1, eps=1.0, iters=1, compile_model=False, lean=False):
        self.model = model
        self.lean = lean
        self.forward = torch.compile(model) if compile_model else model
        self.xi, self.eps, self.iters = xi, eps, iters
        self.embedding = embedding
        self.r = None
        self.shape = self.dtype = None
        self.handle = embedding.register_forward_hook(self._hook) if embedding is not None else None

    def close(self):
        """Remove the forward hook from the embedding."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def _hook(self, module, inputs, output):
        self.shape, self.dtype = output.shape, output.dtype
        if self.r is None:
            return None
        return output + self.r

    def _logits(self, args, kwargs, r):
        if self.embedding is None:
            if r is not None:
                args = (args[0] + r,) + tuple(args[1:])
            return logits_of(self.forward(*args, **kwargs))
        self.r = r
        try:
            return logits_of(self.forward(*args, **kwargs))
        finally:
            self.r = None

    def __call__(self, *args, **kwargs):
        with torch.no_grad():
            p = self._logits(args, kwargs, None)
        shape = args[0].shape if self.embedding is None else self.shape
        like = args[0] if self.embedding is None else p
        # in the embedding output's dtype: a float32 r would promote a bf16 model's hidden states
        d = torch.randn(shape, device=like.device, dtype=None if self.embedding is None else self.dtype)
        for _ in range(self.iters):
            d = (self.xi * normalize_per_sample(d)).requires_grad_()
            q = self._logits(args, kwargs, d)
            if self.lean:
                (d,) = torch.autograd.grad(kl_eager(p, q), d)
                continue
            kl_eager(p, q).backward()
            d = d.grad.detach()
            self.model.zero_grad()
        r = self.eps * normalize_per_sample(d)
        return kl_eager(p, self._logits(args, kwargs, r))


class DenseWeightVAT:
    """The article's algorithm, in place on the full [V, H] embedding matrix (global norm)."""

    def __init__(self, model, embedding, *, xi=10.0, eps=1.0, iters=1):
        self.model, self.embedding = model, embedding
        self.xi, self.eps, self.iters = xi, eps, iters
        self.applied = None

    def __call__(self, *args, **kwargs):
        w = self.embedding.weight
        with torch.no_grad():
            p = logits_of(self.model(*args, **kwargs))
        delta1 = None
        delta2 = torch.randn_like(w)
        for _ in range(self.iters):
            delta2 = self.xi * normalize_global(delta2)
            w.data.add_(delta2 if delta1 is None else delta2 - delta1)
            delta1 = delta2
            q = logits_of(self.model(*args, **kwargs))
            (delta2,) = torch.autograd.grad(kl_eager(p, q), w)  # dense [V, H]
        delta2 = self.eps * normalize_global(delta2)
        w.data.add_(delta2 if delta1 is None else delta2 - delta1)
        self.applied = delta2
        return kl_eager(p, logits_of(self.model(*args, **kwargs)))

    def restore(self):
        """Take the perturbation out of the weight (after the optimizer step)."""
        if self.applied is not None:
            self.embedding.weight.data.sub_(self.applied)
            self.applied = None

