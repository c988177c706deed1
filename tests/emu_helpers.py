"""The CUDA kernels of csrc/cuda/ run on the CPU through the emulator in tests/cuda_emu/.

``load()`` builds (once per test process, cached in build/cuda_emu/) and loads the test-only extension
that registers the CUDA host code as ``torch.ops.fastvat_emu.*`` for CPU tensors. ``ORDERS`` are the
fiber resume orders every emulated call is repeated under: results must agree bit for bit, or a
barrier is missing. ``emulated`` (a fixture factory) swaps ``torch.ops.fastvat.<op>`` for the
order-checked emulated op, so the ordinary op tests run the CUDA kernels unchanged.

FASTVAT_EMU=0 skips these tests (no compiler); FVEMU_LIB=<path> loads a library built elsewhere
(tests/cuda_emu/build.py: a mutant, a sanitizer build) instead of building.
"""
from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "cuda_emu"))

# FVEMU_ORDERS=a,b,... runs fewer (the sanitizer run: finding races is not its job)
ORDERS = tuple(os.environ.get("FVEMU_ORDERS", "").split(",")) if os.environ.get("FVEMU_ORDERS") else (
    "forward", "reverse", "random:7", "greedy", "greedy-reverse", "greedy-random:3")
OPS = ("l2_normalize", "perturb_", "kl_div_with_logits", "_kl_div_with_logits_variant", "embedding_gather_add",
       "embedding_gather_add_backward")

_STATE = {"loaded": False, "error": None}


def load():
    """torch.ops.fastvat_emu, built and loaded once; pytest.skip only where FASTVAT_EMU=0."""
    if os.environ.get("FASTVAT_EMU") == "0":
        pytest.skip("emulated CUDA kernels disabled (FASTVAT_EMU=0)")
    if _STATE["error"] is not None:
        pytest.fail(f"emulated CUDA build failed earlier in this test run: {_STATE['error']}")
    if not _STATE["loaded"]:
        try:
            path = os.environ.get("FVEMU_LIB")
            if not path:
                import build as emu_build  # tests/cuda_emu/build.py

                path = emu_build.build()
            torch.ops.load_library(path)
            _register_autograd()
        except Exception as exc:  # noqa: BLE001 - reported as a test failure, not a skip
            _STATE["error"] = repr(exc)
            raise
        _STATE["loaded"] = True
    return torch.ops.fastvat_emu


def has_op(name):
    return name in dir(torch.ops.fastvat_emu) or _has(torch.ops.fastvat_emu, name)


def _has(ns, name):
    try:
        getattr(ns, name)
        return True
    except (AttributeError, RuntimeError):
        return False


def _register_autograd():
    """The fastvat ops' autograd formulas, also for their emulated twins (the formulas call
    torch.ops.fastvat.*, which `emulated` points at the emulated kernels too)."""
    from fastvat.ops import embedding, kl, norm

    for name, mod, bw, setup in (("l2_normalize", norm, "_l2_backward", "_l2_setup"),
                                 ("kl_div_with_logits", kl, "_kl_backward", "_kl_setup"),
                                 ("embedding_gather_add", embedding, "_gather_backward", "_gather_setup")):
        if hasattr(mod, bw):
            torch.library.register_autograd(f"fastvat_emu::{name}", getattr(mod, bw),
                                            setup_context=getattr(mod, setup))


def _bits(t):
    if not isinstance(t, torch.Tensor):
        return t
    t = t.detach().contiguous()
    return t.view(torch.uint8) if t.numel() else t


@contextlib.contextmanager
def resume_order(order):
    old = os.environ.get("FVEMU_ORDER")
    os.environ["FVEMU_ORDER"] = order
    try:
        yield
    finally:
        if old is None:
            del os.environ["FVEMU_ORDER"]
        else:
            os.environ["FVEMU_ORDER"] = old


class OrderChecked:
    """Calls an emulated op once per resume order (in-place arguments reset to their entry values
    before each) and asserts that every output and every mutated argument agrees bit for bit. The
    last call, in the default order, is the one returned (with autograd)."""

    def __init__(self, op, mutated=(), orders=ORDERS):
        self.op, self.mutated, self.orders, self.calls = op, mutated, orders, 0

    def __call__(self, *args):
        self.calls += 1
        entry = {i: args[i].clone() for i in self.mutated}
        seen = None
        for k, order in enumerate(self.orders[1:] + self.orders[:1]):
            for i, v in entry.items():
                args[i].copy_(v)
            last = k == len(self.orders) - 1
            with resume_order(order), (contextlib.nullcontext() if last else torch.no_grad()):
                out = self.op(*args)
            outs = out if isinstance(out, tuple) else (out,)
            got = [_bits(t) for t in outs] + [_bits(args[i]) for i in self.mutated]
            if seen is None:
                seen = (order, got)
            else:
                for j, (a, b) in enumerate(zip(seen[1], got)):
                    same = torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                    assert same, (f"{self.op}: output {j} differs between resume orders {seen[0]} and {order}"
                                  " (a missing barrier or a read of another thread's unsynchronised write)")
        return out


def checked(name):
    ns = load()
    return OrderChecked(getattr(ns, name), mutated=(0, 2) if name == "perturb_" else ())


@pytest.fixture
def emulated(monkeypatch):
    """emulated() points torch.ops.fastvat.* at the order-checked emulated CUDA kernels (CPU tensors)
    for the rest of the test; at teardown, each op it swapped in must have been called."""
    swapped = {}

    def swap(*names):
        load()
        from fastvat import ops

        if ops.BACKEND == "reference":
            pytest.skip("the fastvat op wrappers take the reference without compiled kernels")
        for name in names or ("l2_normalize", "perturb_", "kl_div_with_logits", "embedding_gather_add",
                              "embedding_gather_add_backward"):
            swapped[name] = checked(name)
            monkeypatch.setattr(torch.ops.fastvat, name, swapped[name], raising=False)
        return swapped

    yield swap
    unused = [n for n, f in swapped.items() if f.calls == 0]
    assert len(unused) < len(swapped) or not swapped, f"the emulated kernels were never called: {unused}"


# ---- errors in units of the last place ----------------------------------------------------------------
def ulp_error(got, truth, dtype, floor=0.0):
    """max |got - truth| / ulp_dtype(max(|truth|, floor)): error in the last place of dtype, against a
    float64 truth; NaN where exactly one is NaN counts as infinite, NaN == NaN and inf == inf as 0."""
    g, t = got.detach().double().flatten(), truth.detach().double().flatten()
    assert g.shape == t.shape, (got.shape, truth.shape)
    if g.numel() == 0:
        return 0.0
    fi = torch.finfo(dtype)
    same = (g == t) | (g.isnan() & t.isnan())
    mag = t.abs().clamp_min(floor).clamp_min(fi.tiny)
    ulp = torch.exp2(torch.floor(torch.log2(mag))) * fi.eps
    err = torch.where(same, torch.zeros_like(g), (g - t).abs() / ulp)
    err = torch.where(err.isnan(), torch.full_like(err, float("inf")), err)
    return err.max().item()


@pytest.fixture(params=["kernels", "emulated-cuda"])
def kernels(request):
    """A test taking this fixture runs twice: on the kernels fastvat loaded (CPU tensors: the CPU
    kernels), and with torch.ops.fastvat.* pointed at the emulated CUDA kernels (``emulated``).
    Cases on a real CUDA device only run once."""
    if request.param == "emulated-cuda":
        params = getattr(getattr(request.node, "callspec", None), "params", {})
        if params.get("device", "cpu") != "cpu":
            pytest.skip("the emulated CUDA kernels take CPU tensors")
        request.getfixturevalue("emulated")()
    return request.param
