"""What every regularizer shares: picking the target, calling the model with r in place,
and leaving the model exactly as it was found."""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from fastvat import _checks, _defaults, _nonfinite, ops
from fastvat._defaults import NonfiniteMode, NormName, TargetName
from fastvat._lm_head import HeadCapture, label_shift, trained_positions
from fastvat._model_io import StateGuard, class_last, extract_logits, resolve_embedding, strip_labels
from fastvat._targets import InputTarget, OutputTarget, Target, WeightTarget

TARGETS = _defaults.TARGETS

# The settings every regularizer shares, in the order its signature takes them (model and embedding
# positional-or-keyword, the rest keyword-only); __repr__ shows them after the regularizer's own.
SHARED_SETTINGS = ("target", "norm", "generator", "drop_labels", "nonfinite", "class_dim", "head")


def _shown(value: Any) -> str:
    """A setting as __repr__ shows it: short for callables and generators (a model's repr is pages)."""
    if isinstance(value, torch.Generator):
        return f"torch.Generator(device={str(value.device)!r})"
    if isinstance(value, nn.Module):
        return repr(value) if not list(value.children()) else f"<{type(value).__name__}>"
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', None) or ''}.{value.__qualname__}".lstrip(".")
    return repr(value)


def _check_embedding_argument(model: nn.Module, embedding: Any, owner: str) -> None:
    """The second positional argument is the embedding for every regularizer. A callable there that is
    not a module of the model is most likely a loss function, passed where FGM/PGD used to take one."""
    if embedding is None or isinstance(embedding, (str, nn.Embedding)):
        return
    if isinstance(embedding, nn.Module) and any(m is embedding for m in model.modules()):
        return  # a submodule of the wrong type: resolve_embedding names its type
    if callable(embedding):
        raise TypeError(
            f"{owner}: embedding (the second positional argument) must be an nn.Embedding of the model or its "
            f"dotted name, got {_shown(embedding)}. Every fastvat regularizer takes (model, embedding=None, *, "
            f"...); FGM, PGD and RandomNoise take a loss function by keyword: loss_fn=F.cross_entropy"
        )


class Regularizer:
    """Base class: ``model`` plus where the perturbation goes (``embedding``/``target``/``norm``).

    Args:
        model: the ``nn.Module`` to regularize; called as ``model(*args, **kwargs)``.
        embedding: an ``nn.Embedding`` of ``model`` (or its dotted name) for the ``"output"`` and
            ``"weight"`` targets; ``None`` perturbs the model's first positional input.
        target: ``"input"``, ``"output"`` (the embedding's output) or ``"weight"`` (its vocabulary
            matrix, out of place); default ``"output"`` with an embedding, else ``"input"``.
        norm: ``"global"``, ``"sample"`` or ``"token"``; default from the per-target table
            (``fastvat._defaults.DEFAULTS``: ``"global"`` for the weight target, else ``"sample"``).
        generator: a ``torch.Generator`` for the random draws, or ``None`` (the global RNG).
        drop_labels: remove ``labels=`` from the model call (the regularizer needs no labels).
        nonfinite: ``"raise"``, ``"zero"`` or ``"ignore"`` (what a NaN/Inf does; see each subclass).
        class_dim: the dim of the logits that holds the classes; ``None``: the last.
        head: a language model's vocabulary head (``nn.Linear``) whose input is taken instead of logits.

    Raises:
        TypeError: a wrongly typed argument (the message names it), including a callable passed
            positionally where the embedding goes.
        ValueError: an out-of-range value or a combination that does not apply.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Regularizer:
        # Python's own message for a third positional argument ("takes from 2 to 3 positional
        # arguments but 4 were given") does not say what changed; the old FGM/PGD order did that.
        if len(args) > 2:
            hint = ("; a loss function goes by keyword: loss_fn=F.cross_entropy"
                    if any(callable(a) and not isinstance(a, nn.Module) for a in args[1:]) else "")
            raise TypeError(
                f"{cls.__name__} takes (model, embedding=None) positionally and every other argument by "
                f"keyword; got {len(args)} positional arguments{hint}"
            )
        return super().__new__(cls)

    def __init__(self, model: nn.Module, embedding: nn.Embedding | str | None = None, *,
                 target: TargetName | None = None, norm: NormName | None = None,
                 generator: torch.Generator | None = None, drop_labels: bool = True,
                 nonfinite: NonfiniteMode = "raise", class_dim: int | None = None,
                 head: nn.Module | None = None) -> None:
        # what a NaN/Inf does in a call, for every regularizer (fastvat/_nonfinite.py)
        self.nonfinite = _checks.choice("nonfinite", nonfinite, _nonfinite.MODES)
        # the logits' class dim; None: the last, refused for logits of 4+ dims (see _model_io.class_last)
        self.class_dim = _checks.class_dim(class_dim)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        _check_embedding_argument(model, embedding, type(self).__name__)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        drop_labels = _checks.flag("drop_labels", drop_labels)
        if target is not None:
            _checks.choice("target", target, TARGETS)
        module: nn.Embedding | None = None
        if embedding is not None:
            module = resolve_embedding(model, embedding)
            if target is None:
                target = "output"
            elif target == "input":
                raise ValueError("target 'input' perturbs the model's input; do not pass embedding= with it")
        else:
            if target in ("output", "weight"):
                raise ValueError(f"target {target!r} needs embedding= (the model's nn.Embedding or its name)")
            target = "input"
        norm_name: str = _defaults.DEFAULTS[target]["norm"] if norm is None else norm
        # the norm is validated once, by the target (fastvat/_targets.py)
        if module is None:
            self._target: Target = InputTarget(norm_name, generator)
        elif target == "output":
            self._target = OutputTarget(module, norm_name, generator)
        else:
            self._target = WeightTarget(module, norm_name, generator)
        self.model = model
        self.embedding = module
        self.target: str = target
        self.norm: str = norm_name
        self.generator = generator
        self.drop_labels = drop_labels
        # a language model's vocabulary head: its input is taken instead of [..., V] logits (_lm_head.py)
        self._head = None
        if head is not None:
            if class_dim not in (None, -1):
                raise ValueError("class_dim does not apply with head=: the head's output dim holds the vocabulary")
            self._head = HeadCapture(model, head)
        # how the call's labels mark the positions a language model trains (None: they do not)
        self._label_shift = label_shift(model, head)
        self._labels = None
        self._positions = None  # the call's trained positions, from its labels and the clean logits' shape
        self._busy = False
        self._given_logits = None  # the caller's logits= during a call, checked against the model's

    # The regularizer's own settings, shown by __repr__ before the shared ones it takes.
    _own_settings: tuple[str, ...] = ()
    _shared_settings: tuple[str, ...] = SHARED_SETTINGS

    def __repr__(self) -> str:
        names = ("model", "embedding") + self._own_settings + self._shared_settings
        return f"{type(self).__name__}({', '.join(f'{n}={_shown(getattr(self, n))}' for n in names)})"

    def _default(self, name: str, value: float | None) -> float:
        """``value``, or the per-target default from the table (fastvat/_defaults.py)."""
        return _defaults.DEFAULTS[self.target][name] if value is None else value  # type: ignore[literal-required]

    @property
    def head(self) -> nn.Module | None:
        """The language-model head passed as ``head=`` (its input is taken instead of logits), or None."""
        return None if self._head is None else self._head.module

    # -- plumbing ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _call(self, args, kwargs):
        """Validate, snapshot state, and yield (args, kwargs) ready for the model."""
        if self._busy:
            raise RuntimeError(
                f"{type(self).__name__} was called again while one of its calls is running "
                "(e.g. from inside the model's forward); use a second instance for nested use"
            )
        self._labels = kwargs.get("labels") if self._label_shift is not None else None
        self._positions = None
        if self.drop_labels:
            kwargs = strip_labels(kwargs)
        t = self._target
        t.begin_call()
        args, kwargs = t.prepare(args, kwargs)
        self._busy = True
        self._given_logits = None
        try:
            with StateGuard(self.model, self.generator):
                yield args, kwargs
        finally:
            t.end_call()
            self._busy = False
            self._given_logits = None
            self._labels = None
            self._positions = None

    def _run(self, args, kwargs):
        """One pass of the model with the target's current spec in place; returns what the model returns."""
        t = self._target
        with t.installed(), self._capturing():
            out = self.model(*t.apply_to_args(args), **kwargs)
        t.check_reached()
        return out

    def _capturing(self):
        return self._head.capturing() if self._head is not None else contextlib.nullcontext()

    def _forward(self, args, kwargs):
        """One pass of the model with the target's current spec in place; returns the logits (with
        ``head=``: the head's input, the final hidden states)."""
        out = self._run(args, kwargs)
        if self._head is not None:
            return self._head.take()
        q = extract_logits(out)
        given = self._given_logits
        if given is not None:
            if given.device != q.device:
                raise ValueError(f"logits is on {given.device} but the model's logits are on {q.device}")
            if given.shape != q.shape:
                raise ValueError(
                    f"logits has shape {tuple(given.shape)} but the model returned logits of shape {tuple(q.shape)}"
                )
        return q

    def _clean_logits(self, args, kwargs, logits):
        """The unperturbed logits (the caller's, or one pass of the model), class dim last; with
        ``head=``, the unperturbed hidden states."""
        if self._head is not None:
            if logits is not None:
                raise ValueError(
                    "logits= cannot be used with head=: the clean pass must give the head's input (the final "
                    "hidden states), which logits do not carry"
                )
            with torch.no_grad(), self._target.clean_pass(), self._head.capturing():
                self.model(*args, **kwargs)
            return self._note_positions(self._head.take().detach())
        if logits is not None:
            if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
                what = logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise TypeError(f"logits must be a floating-point tensor or None, got {what}")
            self._given_logits = logits
            return self._note_positions(class_last(logits.detach(), self.class_dim, what="the logits passed as logits="))
        with torch.no_grad(), self._target.clean_pass():
            return self._note_positions(self._class_last(extract_logits(self.model(*args, **kwargs)).detach()))

    def _note_positions(self, p):
        """Keeps the positions the call's labels train (a language model's), checked against the clean
        logits (or hidden states) ``p``; same positions on the fused and the unfused path."""
        if self._labels is not None:
            self._positions = trained_positions(self._labels, p.shape[:-1], self._label_shift).to(p.device)
        return p

    def _class_last(self, logits):
        """The model's logits laid out as the KL and the row mask take them: classes in the last dim."""
        if self._head is not None:
            return logits  # hidden states: the head's input dim is last already
        return class_last(logits, self.class_dim)

    def _row_mask(self, logits):
        mask = self._target.row_mask_for(logits)
        trained = self._positions
        if trained is None or tuple(trained.shape) != tuple(logits.shape[:-1]):
            return mask
        return trained if mask is None else trained & (mask != 0)

    def _divergence(self, p, q, reduction, *, train_head=True):
        """KL(p || q) over the class dim with the row mask: of logits, or (with ``head=``) of the head's
        outputs on the hidden states p and q, never materialised. ``train_head=False`` (a power step):
        no gradient for the head's parameters."""
        mask = self._row_mask(q)
        if self._head is None:
            return ops.kl_div_with_logits(p, q, mask=mask, reduction=reduction)
        w, b = self._head.weight, self._head.bias
        if not train_head:
            w, b = w.detach(), (None if b is None else b.detach())
        return ops.linear_kl_div(p, q, w, b, mask=mask, reduction=reduction)
