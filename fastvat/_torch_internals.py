"""The private PyTorch APIs fastvat relies on, in one place, each with why no public one serves.

Anything here may change between torch releases; tests/test_op_backend.py and tests/test_bad_inputs.py
exercise every use, so a torch upgrade that breaks one fails there first.
"""
from __future__ import annotations

import torch


def version_counter(t: torch.Tensor) -> int:
    """The tensor's in-place write counter (``Tensor._version``). No public API tells whether a
    tensor was written in place since a point in time; ``ExactPerturbation`` needs exactly that to
    refuse a restore that would discard an optimizer step."""
    return int(t._version)


def has_kernel_for(op: str, dispatch_key: str) -> bool:
    """Whether ``op`` (``"namespace::name"``) has a kernel registered for ``dispatch_key``. Public
    torch can only tell by calling the op on a tensor of that device, which a CPU-only process (or
    an import with no GPU yet initialised) cannot do."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key))
    except Exception:  # very old torch without the query: treat as absent
        return False


def dispatch_stack_empty() -> bool:
    """Whether no ``TorchDispatchMode`` is active. No public query exists; the fused ops' backward
    (fastvat/ops/kl.py and linear_kl.py) scales the forward's gradient buffer in place only outside
    modes such as FakeTensorMode or FlopCounterMode."""
    return torch._C._len_torch_dispatch_stack() == 0
