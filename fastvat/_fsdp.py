"""Models sharded by FSDP: what the regularizers need to know about them.

FSDP2 (``torch.distributed.fsdp.fully_shard``) turns modules into ``FSDPModule`` subclasses in
place; FSDP1 wraps them in ``FullyShardedDataParallel``. Either way a parameter is whole only inside
its unit's forward and backward: outside them it is a shard (a DTensor under FSDP2, possibly on the
CPU with an offload policy), and its dtype is the stored one, not the one the forward computes in
under a mixed-precision policy. The policies are read from FSDP's private state; attribute names
that a torch release lacks make the answers fall back to "no policy", never to an error.
"""
from __future__ import annotations

from torch import nn


def _classes():
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # torch built without torch.distributed
        return None, None
    return FSDPModule, FullyShardedDataParallel


def fully_shard_units(model: nn.Module):
    """The modules of ``model`` (itself included) that ``fully_shard`` (FSDP2) has been applied to."""
    fsdp2, _ = _classes()
    return [] if fsdp2 is None else [m for m in model.modules() if isinstance(m, fsdp2)]


def is_sharded(model: nn.Module) -> bool:
    """Whether any part of ``model`` is sharded by FSDP2 or FSDP1."""
    fsdp2, fsdp1 = _classes()
    return fsdp2 is not None and any(isinstance(m, (fsdp2, fsdp1)) for m in model.modules())


def _fsdp2_state(unit):
    try:
        return unit._get_fsdp_state()
    except (AttributeError, AssertionError):
        return None


def param_dtypes(model: nn.Module):
    """The dtypes FSDP mixed-precision policies make the forward compute in (empty: none set)."""
    fsdp2, fsdp1 = _classes()
    if fsdp2 is None:
        return set()
    found = set()
    for m in model.modules():
        policy = None
        if isinstance(m, fsdp2):
            policy = getattr(_fsdp2_state(m), "_mp_policy", None)
        elif isinstance(m, fsdp1):
            policy = getattr(m, "mixed_precision", None)
        dtype = getattr(policy, "param_dtype", None)
        if dtype is not None:
            found.add(dtype)
    return found


def compute_device_types(model: nn.Module):
    """The device types FSDP gathers parameters onto for the forward (with CPU offload, the shards
    live elsewhere)."""
    fsdp2, fsdp1 = _classes()
    if fsdp2 is None:
        return set()
    found = set()
    for m in model.modules():
        device = None
        if isinstance(m, fsdp2):
            device = getattr(_fsdp2_state(m), "_device", None)
        elif isinstance(m, fsdp1):
            device = getattr(m, "compute_device", None)
        if device is not None:
            found.add(device.type)
    return found


def is_dtensor(tensor) -> bool:
    """Whether ``tensor`` is a DTensor: under FSDP2, a parameter outside its unit's forward and backward."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without torch.distributed
        return False
    return isinstance(tensor, DTensor)


def refuse(model: nn.Module, what: str, why: str):
    """Raise a ``NotImplementedError`` for a regularizer that cannot run on an FSDP-sharded model."""
    if is_sharded(model):
        raise NotImplementedError(f"{what} does not support models sharded by FSDP (fully_shard or "
                                  f"FullyShardedDataParallel): {why}")
