"""Calling the user's model: finding its logits, and leaving its state as it was found."""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

# Keyword arguments that carry supervision; a regularizer on unlabelled data never passes them on.
LABEL_KWARGS = ("labels", "label", "targets")


def extract_logits(output, *, what="the model's output", tuple_index=0):
    """The logits in a model's return value: a tensor, its ``.logits``, a dict's 'logits', or the tuple's
    element ``tuple_index`` (1 for a Hugging Face tuple that starts with the loss)."""
    if isinstance(output, torch.Tensor):
        logits = output
    elif getattr(output, "logits", None) is not None:
        logits = output.logits
    elif isinstance(output, dict) and "logits" in output:
        logits = output["logits"]
    elif (isinstance(output, (tuple, list)) and len(output) > tuple_index
          and isinstance(output[tuple_index], torch.Tensor)):
        logits = output[tuple_index]
    else:
        raise TypeError(
            f"cannot find logits in {what}: expected a tensor, an object with .logits, a dict with 'logits' "
            f"or a tuple whose first element is a tensor; got {type(output).__name__}"
        )
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"the logits in {what} must be a floating-point tensor, got {type(logits).__name__}")
    if logits.dim() == 0:
        raise ValueError(f"the logits in {what} are a 0-dim tensor; a class dim is needed")
    return logits


def class_last(logits, class_dim, *, what="the model's logits"):
    """The logits with their class dim last, where the KL and the row masks expect it.

    ``class_dim=None`` takes the last dim (the Hugging Face layout) for logits of up to three dims;
    for four or more ([N, C, H, W] segmentation maps, say) the last dim is rarely the classes, so the
    caller must say which one it is rather than have it guessed.
    """
    n = logits.dim()
    if class_dim is None:
        if n >= 4:
            raise ValueError(
                f"{what} have {n} dims (shape {tuple(logits.shape)}): the last one (dim {n - 1}) would be "
                f"taken as the classes, which for {n}-D logits is rarely right. Pass class_dim= to choose: "
                "class_dim=1 for [N, C, H, W] segmentation logits, class_dim=-1 to keep the last dim "
                "(three-dim logits are taken as [B, T, C] unless told: a Conv1d's [N, C, L] needs class_dim=1)"
            )
        return logits
    if not -n <= class_dim < n:
        raise ValueError(f"class_dim={class_dim} is out of range for {what} of shape {tuple(logits.shape)} ({n} dims)")
    if n > 1 and class_dim % n == 0:
        raise ValueError(f"class_dim={class_dim} names dim 0 of {what} of shape {tuple(logits.shape)}, the batch "
                         "dim; the classes lie in another dim")
    return logits if class_dim % n == n - 1 else logits.movedim(class_dim, -1)


@contextlib.contextmanager
def math_attention():
    """PyTorch's math attention for the passes that differentiate twice (the gradient penalty) or
    forward-mode (the exact power step): the fused attention kernels have neither derivative; the math
    one is plain matmuls and softmax, the same function."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def strip_labels(kwargs):
    return {k: v for k, v in kwargs.items() if k not in LABEL_KWARGS}


def _cuda_rng_states():
    """The global CUDA generators' states, when CUDA is in use and no graph is being captured."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    if torch.cuda.is_current_stream_capturing():
        return None
    return torch.cuda.get_rng_state_all()


class StateGuard(contextlib.AbstractContextManager):
    """Snapshots what a regularizer's extra passes could change, and puts it back on exit.

    Training flags of every module and the running statistics of every normalisation layer
    (BatchNorm & co.) are restored — also when the model raises halfway. Restoring goes through
    ``.data`` so that a graph built in train mode (which records the buffers) stays valid.
    When the call raises, the random number generators (the global CPU and CUDA ones, and
    ``generator`` if given) are also put back, so a failed call leaves no trace at all: an error
    found halfway (a bad ``logits=``, non-finite values, the model raising) after the random start
    was drawn does not shift the user's random stream. A successful call advances them as usual.
    """

    def __init__(self, model: nn.Module, generator=None):
        self.model = model
        self.generator = generator

    def __enter__(self):
        self.rng = torch.get_rng_state()
        self.cuda_rng = _cuda_rng_states()
        self.gen_rng = self.generator.get_state() if self.generator is not None else None
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.buffers = []
        for m in self.model.modules():
            if isinstance(m, _NormBase) and m.track_running_stats:
                for b in m.buffers(recurse=False):
                    if b is not None:
                        self.buffers.append((b, b.detach().clone()))
        return self

    def __exit__(self, exc_type, exc, tb):
        for m, flag in self.flags:
            m.training = flag
        with torch.no_grad():
            for buf, saved in self.buffers:
                buf.data.copy_(saved)
        if exc_type is not None:
            torch.set_rng_state(self.rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state_all(self.cuda_rng)
            if self.gen_rng is not None:
                self.generator.set_state(self.gen_rng)
        return False


def resolve_embedding(model: nn.Module, embedding):
    """The nn.Embedding the user named (a module of the model, or its dotted name)."""
    if isinstance(embedding, str):
        try:
            module = model.get_submodule(embedding)
        except AttributeError:
            names = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
            raise ValueError(
                f"embedding {embedding!r} is not a submodule of the model; nn.Embedding modules found: {names}"
            ) from None
    elif isinstance(embedding, nn.Module):
        module = embedding
        if not any(m is module for m in model.modules()):
            raise ValueError("embedding is not a submodule of the model passed in")
    else:
        raise TypeError(f"embedding must be an nn.Embedding of the model or its dotted name, got {type(embedding).__name__}")
    if not isinstance(module, nn.Embedding):
        raise TypeError(f"embedding must be an nn.Embedding, got {type(module).__name__}")
    return module
