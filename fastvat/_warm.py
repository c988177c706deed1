"""Warm-started power iteration: the direction a call's backward computes, kept for the next call.

The caller's ``loss.backward()`` reaches r_adv. Under the quadratic model of the KL the gradient it
gets there is ``eps * H * d``: one more power-iteration step, which a cold start throws away. The
store keeps it per key (vocabulary row for the weight target, dataset index for the input and output
targets) and the next call that meets the key starts its power iteration from it.

Each stored entry is rescaled so that its norm group has an RMS element of 1 (a norm group of the
batch it came from: the batch's rows for a global norm, one example for a per-sample norm, one vector
for a per-token norm). Keys never seen start from N(0, 1) draws, which have that scale too, so stored
and fresh entries mix in one global norm without either dominating. A rescale per group does not
change the direction within the group, so on a repeated batch successive calls are exactly a power
iteration.
"""
from __future__ import annotations

import torch

from fastvat import ops
from fastvat import reference as ref


class DirectionStore:
    """Directions of shape ``entry_shape`` for keys ``0 .. size - 1``, grown on demand.

    ``values`` is [size, *entry_shape] in ``dtype`` (bf16 halves the memory); ``seen`` marks, per
    vector along the last dim, the entries written so far. Entries may differ from the stored shape
    in their first dim only (a sequence of another length): shorter ones use a prefix, longer ones grow
    the store, and positions never written count as unseen.
    """

    def __init__(self, dtype=None, capacity=0):
        if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(f"warm_start_dtype must be a floating dtype, got {dtype}")
        self.dtype = dtype
        self.capacity = capacity  # keys known up front (a vocabulary): allocated at once
        self.values = None
        self.seen = None

    # -- memory ------------------------------------------------------------------------------
    def _ensure(self, keys: torch.Tensor, entry_shape, like: torch.Tensor):
        size = max(int(keys.max()) + 1 if keys.numel() else 0, self.capacity)
        entry_shape = tuple(entry_shape)
        if self.values is None:
            dtype = self.dtype or like.dtype
            self.values = torch.zeros((size,) + entry_shape, device=like.device, dtype=dtype)
            self.seen = torch.zeros((size,) + entry_shape[:-1], device=like.device, dtype=torch.bool)
            return
        stored = tuple(self.values.shape[1:])
        if len(stored) != len(entry_shape) or (len(stored) > 1 and stored[1:] != entry_shape[1:]) or (
            len(stored) == 1 and stored != entry_shape
        ):
            raise ValueError(
                f"warm_start: the perturbed tensor's per-key shape {entry_shape} does not match the stored "
                f"{stored}; only the first dim (a sequence length) may change between calls"
            )
        grow_rows = max(size, self.values.shape[0])
        grow_len = max(entry_shape[0], stored[0]) if len(stored) > 1 else stored[0]
        if grow_rows > self.values.shape[0] or (len(stored) > 1 and grow_len > stored[0]):
            # doubling keeps the number of reallocations logarithmic in the dataset size
            rows = max(grow_rows, 2 * self.values.shape[0]) if grow_rows > self.values.shape[0] else grow_rows
            shape = (rows,) + ((grow_len,) + stored[1:] if len(stored) > 1 else stored)
            values = self.values.new_zeros(shape)
            seen = self.seen.new_zeros(shape[:-1])
            values[(slice(0, self.values.shape[0]),) + tuple(slice(0, s) for s in stored)] = self.values
            seen[(slice(0, self.seen.shape[0]),) + tuple(slice(0, s) for s in stored[:-1])] = self.seen
            self.values, self.seen = values, seen

    @staticmethod
    def _view(t, entry_shape):
        """t[:, :L] for entries shorter than the store along their first dim."""
        if len(entry_shape) > 1 and t.shape[1] != entry_shape[0]:
            return t[:, : entry_shape[0]]
        return t

    # -- the two halves of a warm call --------------------------------------------------------
    def start(self, keys: torch.Tensor, shape, like: torch.Tensor, generator=None) -> torch.Tensor:
        """The starting direction for a batch of perturbed tensor ``shape`` whose entries are ``keys``."""
        entry_shape = tuple(shape[1:])
        self._ensure(keys, entry_shape, like)
        dt = ref.acc_dtype(like.dtype)
        fresh = torch.randn(tuple(shape), generator=generator, device=like.device, dtype=dt)
        stored = self._view(self.values[keys], entry_shape).to(dt)
        seen = self._view(self.seen[keys], entry_shape)
        return torch.where(seen.unsqueeze(-1), stored, fresh)

    @torch.no_grad()
    def update(self, keys: torch.Tensor, grad: torch.Tensor, norm: str, mask=None):
        """Store ``grad`` (the backward's gradient at r_adv) for ``keys``, at an RMS of 1 per norm group.

        A gradient holding NaN/Inf (an AMP step the GradScaler will skip, a diverged batch) leaves the
        store as it was, without a host sync; so do groups whose gradient is zero (padding).
        """
        entry_shape = tuple(grad.shape[1:])
        self._ensure(keys, entry_shape, grad)
        dt = ref.acc_dtype(grad.dtype)
        g = grad.to(dt)
        ones = torch.ones_like(g) if mask is None else ref._mask_like(mask, g, dt).expand_as(g)
        count = ref.group_sum(ones, norm)
        unit = ops.l2_normalize(g, norm=norm, mask=mask)
        new = unit * count.sqrt()
        written = ref.group_sum(unit * unit, norm) > 0
        vec_written = written.expand_as(g)[..., 0]
        if mask is not None:
            vec_written = vec_written & (ref._mask_like(mask, g, dt).expand_as(g)[..., 0] != 0)
        vec_written = vec_written & torch.isfinite(g).all()
        old = self._view(self.values[keys], entry_shape)
        old_seen = self._view(self.seen[keys], entry_shape)
        merged = torch.where(vec_written.unsqueeze(-1), new.to(self.values.dtype), old)
        merged_seen = old_seen | vec_written
        index = (keys,) if merged.shape[1:] == self.values.shape[1:] else (keys, slice(0, entry_shape[0]))
        self.values[index] = merged
        self.seen[index] = merged_seen

    # -- state --------------------------------------------------------------------------------
    def state_dict(self):
        return {"values": self.values, "seen": self.seen}

    def load_state_dict(self, state):
        values, seen = state.get("values"), state.get("seen")
        if (values is None) != (seen is None):
            raise ValueError("warm_start state must hold both 'values' and 'seen' (or neither)")
        if values is not None and tuple(seen.shape) != tuple(values.shape[:-1]):
            raise ValueError(
                f"warm_start state: 'seen' has shape {tuple(seen.shape)}, expected {tuple(values.shape[:-1])}"
            )
        self.values = None if values is None else values.clone()
        self.seen = None if seen is None else seen.clone().bool()

    def memory_bytes(self) -> int:
        if self.values is None:
            return 0
        return self.values.numel() * self.values.element_size() + self.seen.numel()
