"""Long runs and composition: 1,000 training steps with VAT stay flat in memory and in the work per
step and leave no hooks behind; weight mode never writes the weights (the optimizer is the only
writer); two VAT objects on one model work; calling a VAT from inside its own model's forward fails
clearly, and a second instance inside works."""
import collections
import contextlib
import gc
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

import fastvat
from fastvat import ops
from fastvat.inplace import ExactPerturbation, perturbed_

from _state import assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


class Tiny(nn.Module):
    """Dense features and token ids -> logits: an input and an embedding to perturb."""

    def __init__(self, vocab=50, dim=8, feat=6, classes=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.inp = nn.Linear(feat, dim)
        self.bn = nn.BatchNorm1d(dim)
        self.fc = nn.Linear(dim, classes)

    def forward(self, x, input_ids, attention_mask=None):
        e = self.emb(input_ids)
        if attention_mask is not None:
            m = attention_mask.to(e.dtype).unsqueeze(-1)
            e = (e * m).sum(1) / m.sum(1).clamp_min(1)
        else:
            e = e.mean(1)
        return self.fc(self.bn(torch.tanh(self.inp(x) + e)))


def _batch(g, b=8, t=5, vocab=50, feat=6, classes=4):
    x = torch.randn(b, feat, generator=g)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    am = torch.ones(b, t, dtype=torch.long)
    am[:, -1] = torch.randint(0, 2, (b,), generator=g)
    y = torch.randint(0, classes, (b,), generator=g)
    return x, ids, am, y


def _live_tensors():
    """Tensors with data. Not FakeTensors: torch.compile in an earlier test module leaves some behind
    that are freed at some later point, which would count as this run's memory shrinking."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some lazily deprecated torch objects warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and not isinstance(o, FakeTensor))


def _rss_bytes():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # not Linux
        return 0


def _no_fastvat_leftovers(model):
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, f"hook left on {name!r}"
        assert "forward" not in m.__dict__, f"patched forward left on {name!r}"


class _OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched while it is active: the work a step does, whatever the load
    of the machine it runs on."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def test_1000_steps_flat_memory_constant_work_no_leftovers():
    torch.manual_seed(0)
    model = Tiny()
    # One step uses three regularizers on three targets: the weight target (forward patching),
    # the embedding output (hooks) and the input; the order rotates so every path runs every step.
    vat_w = fastvat.VAT(model, embedding=model.emb, target="weight")
    vat_o = fastvat.VAT(model, embedding="emb", iters=1)
    vat_i = fastvat.VAT(model, iters=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    batches = [_batch(g) for _ in range(16)]
    checkpoints = {}
    steps, warmup = 1000, 50
    # Work per step: the ops of three steps just before the warm-up checkpoint and of the three steps
    # a whole number of periods (regularizer x batch) later, near the end, must be the same.
    period = 3 * len(batches)
    early = list(range(warmup - 3, warmup))
    late = [s + period * ((steps - warmup) // period) for s in early]
    counted = {}
    for step in range(steps):
        x, ids, am, y = batches[step % len(batches)]
        counter = _OpCounter() if step in early or step in late else contextlib.nullcontext()
        with counter:
            opt.zero_grad(set_to_none=True)
            logits = model(x, ids, attention_mask=am)
            vat = (vat_w, vat_o, vat_i)[step % 3]
            loss = F.cross_entropy(logits, y) + vat(x, ids, attention_mask=am, logits=logits.detach())
            loss.backward()
            opt.step()
        if isinstance(counter, _OpCounter):
            counted[step] = counter.ops
        assert torch.isfinite(loss)
        if step + 1 in (warmup, steps // 2, steps):
            checkpoints[step + 1] = (_live_tensors(), _rss_bytes())
        del logits, loss
    _no_fastvat_leftovers(model)
    assert not any(v._busy for v in (vat_w, vat_o, vat_i))
    # memory: the number of live tensors is exactly flat after warm-up, RSS grows by < 16 MB
    (t_warm, rss_warm), (t_mid, _), (t_end, rss_end) = (checkpoints[warmup], checkpoints[steps // 2],
                                                        checkpoints[steps])
    assert t_warm == t_mid == t_end, f"live tensors grew: {t_warm} -> {t_mid} -> {t_end}"
    assert rss_end - rss_warm < 16 * 2**20, f"RSS grew by {(rss_end - rss_warm) / 2**20:.1f} MB"
    # work: every regularizer's step dispatches the same ops, as many times, near the end as at warm-up
    for a, b in zip(early, late):
        assert sum(counted[a].values()) > 0
        more, fewer = dict(counted[b] - counted[a]), dict(counted[a] - counted[b])
        assert counted[b] == counted[a], f"step {b} differs from step {a}: more {more}, fewer {fewer}"


def test_weight_mode_never_writes_the_weights():
    torch.manual_seed(0)
    model = Tiny()
    vat = fastvat.VAT(model, embedding=model.emb, target="weight")
    g = torch.Generator().manual_seed(1)
    x, ids, am, _ = _batch(g)
    before = snapshot(model)
    for _ in range(100):
        vat(x, ids, attention_mask=am)
    assert_unchanged(before, snapshot(model), rng=False)  # bits and version counters

    # In training, the optimizer step is the only writer of the embedding matrix.
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    w = model.emb.weight
    for step in range(20):
        x, ids, am, y = _batch(g)
        opt.zero_grad(set_to_none=True)
        v0, bits = w._version, w.detach().clone()
        loss = F.cross_entropy(model(x, ids, attention_mask=am), y) + vat(x, ids, attention_mask=am)
        loss.backward()
        assert w._version == v0 and torch.equal(w.detach(), bits), "VAT or backward wrote the weight"
        opt.step()
        assert w._version > v0 and not torch.equal(w.detach(), bits)


def test_two_vat_objects_on_one_model():
    torch.manual_seed(0)
    model = Tiny()
    on_input = fastvat.VAT(model)  # perturbs x
    on_embedding = fastvat.VAT(model, embedding=model.emb)  # perturbs the embedding output
    on_weight = fastvat.VAT(model, embedding=model.emb, target="weight")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        x, ids, am, y = _batch(g)
        opt.zero_grad(set_to_none=True)
        logits = model(x, ids, attention_mask=am)
        l1 = on_input(x, ids, attention_mask=am, logits=logits.detach())
        l2 = on_embedding(x, ids, attention_mask=am, logits=logits.detach())
        l3 = on_weight(x, ids, attention_mask=am, logits=logits.detach())
        loss = F.cross_entropy(logits, y) + l1 + l2 + l3
        loss.backward()
        opt.step()
        assert all(torch.isfinite(v) and v > 0 for v in (l1, l2, l3))
        assert all(p.grad is not None for p in model.parameters())
    _no_fastvat_leftovers(model)
    # the perturbations really are different objects: input-shaped, embedding-output-shaped, vocab-shaped
    assert on_input.perturbation(x, ids).shape == x.shape
    assert on_embedding.perturbation(x, ids).shape == ids.shape + (8,)
    assert on_weight.perturbation(x, ids).shape == model.emb.weight.shape


class CallsVAT(nn.Module):
    """A model whose forward calls a regularizer (on itself, or on a submodule)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh())
        self.head = nn.Linear(8, 3)
        self.inner = None
        self.inner_losses = []

    def forward(self, x):
        h = self.body(x)
        if self.inner is not None:
            self.inner_losses.append(self.inner(x))
        return self.head(h)


def test_reentrant_call_of_the_same_vat_fails_clearly():
    torch.manual_seed(0)
    model = CallsVAT()
    x = torch.randn(8, 5)
    model(x).sum().backward()
    vat = fastvat.VAT(model)
    model.inner = vat
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"VAT was called again while one of its calls is running"):
        vat(x)
    assert_unchanged(before, snapshot(model))
    assert not vat._busy
    model.inner = None
    # still usable: it gives what a VAT that never failed gives from the same RNG state
    torch.manual_seed(1)
    again = vat(x)
    torch.manual_seed(1)
    assert torch.isfinite(again) and torch.equal(again, fastvat.VAT(model)(x))


def test_second_instance_inside_the_forward_works():
    torch.manual_seed(0)
    model = CallsVAT()
    x = torch.randn(8, 5)
    model(x).sum().backward()
    # Own generators, so that the inner calls' draws do not shift the outer one's.
    outer = fastvat.VAT(model, generator=torch.Generator().manual_seed(1))
    model.inner = fastvat.VAT(model.body[0], generator=torch.Generator().manual_seed(2))  # a VAT on a submodule
    before = snapshot(model)
    loss = outer(x)
    assert torch.isfinite(loss)
    assert len(model.inner_losses) >= 3 and all(torch.isfinite(v) and v > 0 for v in model.inner_losses)
    assert_unchanged(before, snapshot(model), rng=False)
    # the inner calls do not disturb the outer one: its loss is the one without them
    model.inner = None
    assert torch.equal(loss, fastvat.VAT(model, generator=torch.Generator().manual_seed(1))(x))


class SharedEmbedding(nn.Module):
    """Its forward runs a weight-target VAT on a sub-model that shares the embedding."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 6)
        self.sub = nn.Sequential(self.emb, nn.Flatten(), nn.Linear(6 * 4, 3))
        self.fc = nn.Linear(6, 3)
        self.inner = None

    def forward(self, input_ids):
        out = self.fc(self.emb(input_ids).mean(1))
        if self.inner is not None:
            self.inner(input_ids)
        return out


def test_nested_weight_targets_on_a_shared_embedding_leave_no_trace():
    """Both calls patch/hook the same nn.Embedding: the inner one must not remove the outer one's
    patched forward (it used to `del` it, and the outer exit then failed with AttributeError)."""
    torch.manual_seed(0)
    model = SharedEmbedding()
    ids = torch.randint(0, 30, (8, 4))
    # Own generators, so that the inner calls' draws do not shift the outer one's.
    outer = fastvat.VAT(model, embedding=model.emb, target="weight", generator=torch.Generator().manual_seed(1))
    model.inner = fastvat.VAT(model.sub, embedding=model.emb, target="weight",
                              generator=torch.Generator().manual_seed(2))
    before = snapshot(model)
    loss = outer(ids)
    assert torch.isfinite(loss)
    assert_unchanged(before, snapshot(model), rng=False)
    assert "forward" not in model.emb.__dict__
    # the inner calls, on the embedding the outer one perturbs, leave the outer loss as it is without them
    model.inner = None
    want = fastvat.VAT(model, embedding=model.emb, target="weight", generator=torch.Generator().manual_seed(1))(ids)
    assert torch.equal(loss, want)


# ------------------------------------------------------------------------------------------------
# The article's in-place path: perturb_/restore_ drifts, ExactPerturbation does not
# ------------------------------------------------------------------------------------------------
def test_exact_restore_is_bit_identical_after_1000_bf16_cycles():
    g = torch.Generator().manual_seed(0)
    shape = (4096, 64)
    w = nn.Parameter((torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16))
    w0 = w.detach().clone()
    dirs = [torch.randn(shape, generator=g).to(torch.bfloat16) for _ in range(4)]
    pert = ExactPerturbation(w)
    for i in range(1000):
        scale = (1.0, 10.0)[i % 2]
        with pert.perturbed(dirs[i % 4], scale=scale):
            if i < 2:
                r = w.detach().double() - w0.double()
                assert abs(float(r.norm()) - scale) < 0.02 * scale  # really perturbed, by eps
    assert torch.equal(w.detach().view(torch.int16), w0.view(torch.int16))
    assert pert.nbytes == w.numel() * w.element_size()  # the one backup buffer, reused
    # the article's subtract-back on the same matrix does drift, already after a few cycles
    w2 = w0.clone()
    with torch.no_grad():
        for i in range(10):
            ops.restore_(w2, ops.perturb_(w2, dirs[i % 4], scale=1.0))
    assert not torch.equal(w2, w0)


def test_exact_perturbation_in_the_articles_training_loop():
    torch.manual_seed(0)
    model = Tiny()
    w = model.emb.weight
    pert = ExactPerturbation(w)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)
    x, ids, am, y = _batch(g)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x, ids), y).backward()
        direction = w.grad.detach().clone()  # the article: the gradient w.r.t. the matrix
        bits = w.detach().clone()
        with pert.perturbed(direction, scale=1.0):
            F.cross_entropy(model(x, ids), y).backward()  # adversarial gradients accumulate at W + r
        assert torch.equal(w.detach(), bits)
        opt.step()
    # chained applies (several ascent steps) restore to the state before the first one
    bits = w.detach().clone()
    pert.apply(torch.randn(w.shape), scale=1.0)
    pert.apply(torch.randn(w.shape), scale=2.0)
    pert.restore()
    assert torch.equal(w.detach(), bits)
    # an optimizer step while perturbed is refused (restoring would discard it) unless forced
    pert.apply(torch.randn(w.shape), scale=1.0)
    opt.step()
    with pytest.raises(RuntimeError, match="written in place while perturbed"):
        pert.restore()
    pert.restore(force=True)
    assert torch.equal(w.detach(), bits)
    # the body raising restores too; a zero direction is a zero perturbation
    with pytest.raises(KeyError):
        with pert.perturbed(torch.randn(w.shape), scale=1.0):
            raise KeyError("boom")
    assert torch.equal(w.detach(), bits) and not pert.active
    with perturbed_(w, torch.zeros(w.shape), scale=5.0):
        assert torch.equal(w.detach(), bits)
    pert.release()
    assert pert.nbytes == 0
