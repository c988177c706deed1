"""Bit-exact snapshots of everything a fastvat call could disturb, for the 'nothing lost' tests.

    before = snapshot(model, tensors={"w": w}, generator=g)
    ...call that must leave no trace...
    assert_unchanged(before, snapshot(model, tensors={"w": w}, generator=g))

or ``with unchanged(model):``. What is compared:

- parameters: the same objects, bit-identical values (compared as raw bytes, so NaN payloads and
  -0.0 count), dtype, shape, ``requires_grad``, and their autograd version counter (an in-place
  write that was undone still shows up there; pass ``versions=False`` when writes are expected);
- ``.grad``: None stays None, a tensor stays the same object with the same bytes;
- buffers (BatchNorm running statistics, num_batches_tracked, anything else): bit-identical;
- the ``training`` flag of every module;
- hooks of every module (forward, forward-pre, backward, backward-pre, with-kwargs flags) and the
  global module hooks: same keys, same callables; a ``forward`` instance attribute (what the
  weight target patches) present/absent and the same object;
- the global CPU RNG state, the CUDA ones when CUDA is initialised, and ``generator`` if given;
- grad mode;
- extra tensors passed in ``tensors`` (the arguments of an op): bytes and version counter.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.modules import module as _module_mod

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
)
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def _bytes(t: torch.Tensor):
    """The tensor's raw bytes on the CPU (a copy), or None for tensors without data (meta)."""
    if t.device.type == "meta":
        return None
    t = t.detach()
    if t.is_sparse:
        t = t.to_dense()
    return t.cpu().contiguous().reshape(-1).view(torch.uint8).clone()


def _tensor_record(t):
    if t is None:
        return None
    return {
        "id": id(t),
        "dtype": t.dtype,
        "shape": tuple(t.shape),
        "device": str(t.device),
        "bytes": _bytes(t),
        "version": t._version,
    }


def _hooks(m: nn.Module):
    out = {}
    for name in _HOOK_DICTS:
        d = getattr(m, name, None)
        if d is not None:
            out[name] = [(k, id(v)) for k, v in d.items()]
    return out


def snapshot(model: nn.Module | None = None, *, tensors=None, generator=None):
    """Everything listed in the module docstring, as plain Python data and byte tensors."""
    snap = {
        "rng": torch.get_rng_state().clone(),
        "cuda_rng": ([s.clone() for s in torch.cuda.get_rng_state_all()]
                     if torch.cuda.is_available() and torch.cuda.is_initialized() else None),
        "generator": generator.get_state().clone() if generator is not None else None,
        "grad_enabled": torch.is_grad_enabled(),
        "global_hooks": {n: [(k, id(v)) for k, v in getattr(_module_mod, n).items()]
                         for n in _GLOBAL_HOOKS if hasattr(_module_mod, n)},
        "tensors": {k: _tensor_record(v) for k, v in (tensors or {}).items()},
    }
    if model is not None:
        snap["params"] = {}
        for name, p in model.named_parameters():
            rec = _tensor_record(p)
            rec["requires_grad"] = p.requires_grad
            rec["grad"] = _tensor_record(p.grad)
            if rec["grad"] is not None:
                del rec["grad"]["version"]  # accumulation bumps it; bytes and identity decide
            snap["params"][name] = rec
        snap["buffers"] = {}
        for name, b in model.named_buffers():
            rec = _tensor_record(b)
            del rec["version"]  # StateGuard restores through .data, which leaves the counter alone
            snap["buffers"][name] = rec
        snap["training"] = [(n, m.training) for n, m in model.named_modules()]
        snap["hooks"] = [(n, _hooks(m)) for n, m in model.named_modules()]
        snap["forward_attr"] = [(n, id(m.__dict__["forward"]) if "forward" in m.__dict__ else None)
                                for n, m in model.named_modules()]
    return snap


def _diff_tensor(path, a, b, out, versions):
    if a is None or b is None:
        if a is not b:
            out.append(f"{path}: {'None' if a is None else 'tensor'} -> {'None' if b is None else 'tensor'}")
        return
    for key in ("id", "dtype", "shape", "device"):
        if a[key] != b[key]:
            out.append(f"{path}.{key}: {a[key]} -> {b[key]}")
            return
    if a["bytes"] is not None and not torch.equal(a["bytes"], b["bytes"]):
        out.append(f"{path}: values changed")
    if versions and "version" in a and a["version"] != b.get("version"):
        out.append(f"{path}: written in place (version {a['version']} -> {b.get('version')})")
    if "requires_grad" in a and a["requires_grad"] != b["requires_grad"]:
        out.append(f"{path}.requires_grad: {a['requires_grad']} -> {b['requires_grad']}")
    if "grad" in a or "grad" in b:
        _diff_tensor(path + ".grad", a.get("grad"), b.get("grad"), out, versions)


def differences(before, after, *, versions=True, rng=True):
    """A list of human-readable differences between two snapshots (empty when identical)."""
    out = []
    if rng:
        if not torch.equal(before["rng"], after["rng"]):
            out.append("global CPU RNG state changed")
        if before["cuda_rng"] is not None and after["cuda_rng"] is not None:
            if any(not torch.equal(a, b) for a, b in zip(before["cuda_rng"], after["cuda_rng"])):
                out.append("global CUDA RNG state changed")
        if before["generator"] is not None and not torch.equal(before["generator"], after["generator"]):
            out.append("generator state changed")
    if before["grad_enabled"] != after["grad_enabled"]:
        out.append("grad mode changed")
    if before["global_hooks"] != after["global_hooks"]:
        out.append("global module hooks changed")
    for k in before["tensors"]:
        _diff_tensor(f"tensor {k}", before["tensors"][k], after["tensors"].get(k), out, versions)
    if "params" in before:
        if list(before["params"]) != list(after["params"]):
            out.append(f"parameter names changed: {list(before['params'])} -> {list(after['params'])}")
        for k in before["params"]:
            _diff_tensor(f"param {k}", before["params"][k], after["params"].get(k), out, versions)
        if list(before["buffers"]) != list(after["buffers"]):
            out.append("buffer names changed")
        for k in before["buffers"]:
            _diff_tensor(f"buffer {k}", before["buffers"][k], after["buffers"].get(k), out, versions)
        for key in ("training", "hooks", "forward_attr"):
            if before[key] != after[key]:
                changed = [a[0] for a, b in zip(before[key], after[key]) if a != b]
                out.append(f"{key} changed on modules {changed or '(structure)'}")
    return out


def assert_unchanged(before, after, **kwargs):
    diffs = differences(before, after, **kwargs)
    assert not diffs, "state changed:\n  " + "\n  ".join(diffs)


@contextlib.contextmanager
def unchanged(model=None, *, tensors=None, generator=None, **kwargs):
    """Asserts on exit (also when the body raises) that nothing in the snapshot changed."""
    before = snapshot(model, tensors=tensors, generator=generator)
    try:
        yield before
    finally:
        assert_unchanged(before, snapshot(model, tensors=tensors, generator=generator), **kwargs)

