"""Faults: a model that raises halfway, NaN/Inf in logits or gradients, zero gradients.

Contract: a call that raises leaves no trace — hooks removed, the weight target's patched forward
gone, weights bit-identical and never written (out-of-place modes), .grad, BatchNorm statistics,
training flags and the RNGs as they were. NaN/Inf never becomes a silent NaN loss: every
regularizer's ``nonfinite`` option raises (default) a FloatingPointError naming where it appeared,
or zeroes the perturbation (or the loss) with a warning, or (``"ignore"``) skips the check.
"""
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastvat

from _state import assert_unchanged, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


class Boom(RuntimeError):
    pass


class Faulty(nn.Module):
    """Token or dense model with BN and dropout that can fail on its n-th forward, in forward or in
    backward, or produce NaN/Inf logits from its n-th forward on."""

    def __init__(self, tokens):
        super().__init__()
        self.tokens = tokens
        if tokens:
            self.emb = nn.Embedding(20, 6)
        else:
            self.inp = nn.Linear(5, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(6, 3)
        self.calls = 0
        self.fail_on = None  # raise in forward on this call
        self.fail_backward_on = None  # raise in the backward of this call's graph
        self.bad_from = None  # logits non-finite from this call on
        self.bad_value = float("nan")
        self.bad_grad_from = None  # gradient through the hidden layer non-finite from this call on
        self.bad_grad_value = float("inf")

    def forward(self, x, attention_mask=None):
        self.calls += 1
        call = self.calls
        h = self.emb(x).mean(1) if self.tokens else self.inp(x)
        if self.fail_on == call:
            raise Boom(f"model failed on call {call}")
        if self.fail_backward_on == call and h.requires_grad:
            h.register_hook(lambda g: (_ for _ in ()).throw(Boom(f"backward failed on call {call}")))
        if self.bad_grad_from is not None and call >= self.bad_grad_from and h.requires_grad:
            h.register_hook(lambda g: torch.full_like(g, self.bad_grad_value))
        out = self.fc(self.drop(self.bn(h)))
        if self.bad_from is not None and call >= self.bad_from:
            out = out + self.bad_value
        return out


def _model(tokens):
    torch.manual_seed(0)
    m = Faulty(tokens)
    m.train()
    x = _inputs(tokens)
    m(x).sum().backward()  # existing .grad and BN statistics to preserve
    m.fc.eval()  # a mixed train/eval tree
    m.calls = 0
    return m


def _inputs(tokens):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 20, (8, 5), generator=g) if tokens else torch.randn(8, 5, generator=g)


Y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])

REGULARIZERS = {
    "VAT": lambda m, kw: fastvat.VAT(m, iters=2, **kw),
    "VAT-iters0": lambda m, kw: fastvat.VAT(m, iters=0, **kw),
    "RandomNoise": lambda m, kw: fastvat.RandomNoise(m, k=2, **kw),
    "GradientPenalty": lambda m, kw: fastvat.GradientPenalty(m, **kw),
    "FGM": lambda m, kw: fastvat.FGM(m, loss_fn=F.cross_entropy, **kw),
    "PGD": lambda m, kw: fastvat.PGD(m, loss_fn=F.cross_entropy, steps=2, random_start=True, **kw),
}
TARGETS = {"input": {}, "output": {"embedding": "emb"}, "weight": {"embedding": "emb", "target": "weight"}}
COMBOS = [(r, t) for r in REGULARIZERS for t in TARGETS if not (r == "GradientPenalty" and t == "weight")]


def _call(reg, x):
    return reg(x, y=Y) if isinstance(reg, (fastvat.FGM, fastvat.PGD)) else reg(x)


@pytest.mark.parametrize("reg_name,target", COMBOS)
def test_model_raising_halfway_leaves_no_trace(reg_name, target):
    tokens = target != "input"
    model = _model(tokens)
    x = _inputs(tokens)
    reg = REGULARIZERS[reg_name](model, TARGETS[target])
    before = snapshot(model)
    model.calls = 0
    _call(reg, x)  # count the passes: every one of them gets a fault below
    passes = model.calls
    assert passes >= 1
    assert_unchanged(before, snapshot(model), rng=False)  # success: the RNG advanced, nothing else
    for where in ("forward", "backward"):
        for n in range(1, passes + 1):
            model.calls, model.fail_on, model.fail_backward_on = 0, None, None
            if where == "forward":
                model.fail_on = n
            else:
                model.fail_backward_on = n
            before = snapshot(model)
            try:
                _call(reg, x)
            except Boom:
                pass
            else:
                # A pass whose graph is not differentiated inside the call (the clean pass, the
                # final pass) cannot fail in backward; everything else must have raised.
                assert where == "backward", f"forward fault on pass {n} was swallowed"
            assert_unchanged(before, snapshot(model), rng=where == "forward")
            assert not reg._busy
    # and the regularizer still works afterwards: as one that never saw a fault (same RNG draws)
    model.calls, model.fail_on, model.fail_backward_on = 0, None, None
    torch.manual_seed(7)
    loss = _call(reg, x)
    torch.manual_seed(7)
    fresh = _call(REGULARIZERS[reg_name](model, TARGETS[target]), x)
    assert torch.isfinite(loss) and torch.equal(loss, fresh)


def test_user_patched_forward_survives_the_weight_target():
    """An embedding whose forward the user patched keeps the patch (and it is used)."""
    model = _model(tokens=True)
    calls = []
    original = model.emb.forward

    def patched(ids):
        calls.append(1)
        return original(ids)

    model.emb.forward = patched
    x = _inputs(True)
    vat = fastvat.VAT(model, embedding=model.emb, target="weight")
    before = snapshot(model)
    loss = vat(x)
    assert torch.isfinite(loss) and len(calls) == 3  # clean, power step, final pass
    model.calls, model.fail_on = 0, 2
    with pytest.raises(Boom):
        vat(x)
    assert model.emb.__dict__["forward"] is patched
    assert_unchanged(before, snapshot(model), rng=False)


# ------------------------------------------------------------------------------------------------
# NaN / Inf
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
@pytest.mark.parametrize("bad_from,where", [(1, "clean logits"), (2, "power iteration"), (4, "adversarial pass")])
def test_nonfinite_raise_names_where(target, bad_value, bad_from, where):
    tokens = target != "input"
    model = _model(tokens)
    x = _inputs(tokens)
    vat = fastvat.VAT(model, iters=2, **TARGETS[target])  # passes: clean, 2 power steps, adversarial
    model.bad_from, model.bad_value = bad_from, bad_value
    before = snapshot(model)
    with pytest.raises(FloatingPointError, match=where):
        vat(x)
    assert_unchanged(before, snapshot(model))
    if bad_from < 4:  # perturbation() makes no adversarial pass
        model.calls = 0
        with pytest.raises(FloatingPointError, match=where):
            vat.perturbation(x)


@pytest.mark.parametrize("target", list(TARGETS))
def test_nonfinite_in_gradient_raises(target):
    tokens = target != "input"
    model = _model(tokens)
    x = _inputs(tokens)
    model.bad_grad_from = 2  # Inf flows back through the power iteration only
    vat = fastvat.VAT(model, **TARGETS[target])
    before = snapshot(model)
    with pytest.raises(FloatingPointError, match="power iteration"):
        vat(x)
    assert_unchanged(before, snapshot(model))


def test_nonfinite_in_given_logits_raises():
    model = _model(False)
    x = _inputs(False)
    logits = torch.randn(8, 3)
    logits[3, 1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"logits passed as logits="):
        fastvat.VAT(model)(x, logits=logits)


@pytest.mark.parametrize("target", list(TARGETS))
def test_nonfinite_zero_uses_a_zero_perturbation(target):
    tokens = target != "input"
    model = _model(tokens)
    model.eval()  # no dropout: the loss at a zero perturbation is exactly KL(p || p) = 0
    x = _inputs(tokens)
    vat = fastvat.VAT(model, nonfinite="zero", **TARGETS[target])
    model.bad_grad_from = 2
    with pytest.warns(RuntimeWarning, match="power iteration.*zero perturbation"):
        loss = vat(x)
    assert float(loss.detach()) == 0.0
    loss.backward()  # still a loss with a graph: the final pass at x + 0
    model.calls = 0
    with pytest.warns(RuntimeWarning, match="zero perturbation"):
        r = vat.perturbation(x)
    assert torch.count_nonzero(r) == 0 and torch.isfinite(r).all()


@pytest.mark.parametrize("bad_from", [1, 3])
def test_nonfinite_zero_returns_a_zero_loss_when_logits_are_bad(bad_from):
    model = _model(False)
    x = _inputs(False)
    vat = fastvat.VAT(model, nonfinite="zero")
    model.bad_from = bad_from  # clean logits, or the adversarial pass
    before = snapshot(model)
    with pytest.warns(RuntimeWarning, match="zero loss"):
        loss = vat(x)
    assert float(loss.detach()) == 0.0
    assert_unchanged(before, snapshot(model), rng=False)


def test_nonfinite_ignore_does_not_check():
    model = _model(False)
    x = _inputs(False)
    model.bad_from = 3  # NaN logits in the adversarial pass (clean, power step, adversarial)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = fastvat.VAT(model, nonfinite="ignore")(x)
    assert torch.isnan(loss)


def test_finite_calls_are_unaffected_by_the_option():
    model = _model(False)
    x = _inputs(False)
    losses = []
    for mode in ("raise", "zero", "ignore"):
        g = torch.Generator().manual_seed(5)
        losses.append(fastvat.VAT(model, nonfinite=mode, generator=g)(x))
    # same generator and the same model in train mode: dropout draws from the global RNG, so
    # compare in eval mode instead for exact equality
    model.eval()
    exact = []
    for mode in ("raise", "zero", "ignore"):
        g = torch.Generator().manual_seed(5)
        exact.append(fastvat.VAT(model, nonfinite=mode, generator=g)(x))
    assert all(torch.isfinite(v) for v in losses)
    assert torch.equal(exact[0], exact[1]) and torch.equal(exact[0], exact[2])


# ------------------------------------------------------------------------------------------------
# NaN / Inf in RandomNoise, GradientPenalty, FGM and PGD: the same nonfinite= as VAT's
# ------------------------------------------------------------------------------------------------
OTHERS = {
    "RandomNoise": lambda m, kw: fastvat.RandomNoise(m, k=2, **kw),
    "RandomNoise-loss_fn": lambda m, kw: fastvat.RandomNoise(m, k=2, loss_fn=F.cross_entropy, **kw),
    "GradientPenalty": lambda m, kw: fastvat.GradientPenalty(m, **kw),
    "GradientPenalty-mse": lambda m, kw: fastvat.GradientPenalty(m, form="mse", estimator="exact", **kw),
    "FGM": lambda m, kw: fastvat.FGM(m, loss_fn=F.cross_entropy, **kw),
    "PGD": lambda m, kw: fastvat.PGD(m, loss_fn=F.cross_entropy, steps=2, **kw),
    "PGD-random-start": lambda m, kw: fastvat.PGD(m, loss_fn=F.cross_entropy, steps=2, random_start=True, **kw),
}
# (regularizer, fault, n, where the message must say it appeared, what nonfinite="zero" does). The fault
# is NaN/Inf logits from the model's n-th forward on ("logits"), or an Inf gradient through its hidden
# layer in the graph of the n-th forward on ("grad"). Passes: RandomNoise clean (without loss_fn), then
# k=2 noisy; GradientPenalty one; FGM gradient, adversarial; PGD 2 ascent steps, adversarial.
NONFINITE_CASES = [
    ("RandomNoise", "logits", 1, r"the clean logits \(the model's output at the unperturbed input\)", "loss"),
    ("RandomNoise", "logits", 2, r"the noisy pass 1 of 2 \(the model's logits at x \+ r\)", "loss"),
    ("RandomNoise", "logits", 3, r"the noisy pass 2 of 2", "loss"),
    ("RandomNoise-loss_fn", "logits", 1, r"the noisy pass 1 of 2 \(loss_fn of the model's logits", "loss"),
    ("RandomNoise-loss_fn", "logits", 2, r"the noisy pass 2 of 2 \(loss_fn", "loss"),
    ("GradientPenalty", "logits", 1, r"the model's logits at x", "loss"),
    ("GradientPenalty", "grad", 1, r"the input gradient", "loss"),
    # d(u·f)/df = u: a NaN logit never reaches the mse penalty, which stays finite; still an error
    ("GradientPenalty-mse", "logits", 1, r"the model's logits at x", "loss"),
    ("GradientPenalty-mse", "grad", 1, r"the input gradient", "loss"),
    ("FGM", "logits", 1, r"the loss at x \(the unperturbed input\)", "loss"),
    ("FGM", "logits", 2, r"the adversarial pass \(the loss at x \+ r_adv\)", "loss"),
    ("FGM", "grad", 1, r"the gradient of the loss at x", "perturbation"),
    ("PGD", "logits", 1, r"the loss at x \(the unperturbed input\)", "loss"),
    ("PGD", "logits", 2, r"ascent step 2 of 2 \(the loss at x \+ r\)", "loss"),
    ("PGD", "logits", 3, r"the adversarial pass", "loss"),
    ("PGD", "grad", 1, r"the gradient of the loss at x \(ascent step 1 of 2\)", "perturbation"),
    ("PGD", "grad", 2, r"ascent step 2 of 2 \(the gradient of the loss at x \+ r\)", "perturbation"),
    ("PGD-random-start", "logits", 1, r"ascent step 1 of 2 \(the loss at x \+ r\)", "loss"),
    ("PGD-random-start", "grad", 1, r"ascent step 1 of 2 \(the gradient", "perturbation"),
]
NONFINITE_COMBOS = [(c, t) for c in NONFINITE_CASES for t in TARGETS
                    if not (c[0].startswith("GradientPenalty") and t == "weight")]
_ids = [f"{c[0]}-{c[1]}{c[2]}-{t}" for c, t in NONFINITE_COMBOS]


def _other(name, target, **kw):
    tokens = target != "input"
    model = _model(tokens)
    return model, _inputs(tokens), OTHERS[name](model, {**TARGETS[target], **kw})


def _fault(model, fault, n, bad_value=float("nan")):
    model.calls = 0
    if fault == "logits":
        model.bad_from, model.bad_value = n, bad_value
    else:
        model.bad_grad_from, model.bad_grad_value = n, bad_value


def _call_other(reg, x):
    supervised = isinstance(reg, (fastvat.FGM, fastvat.PGD)) or getattr(reg, "loss_fn", None) is not None
    return reg(x, y=Y) if supervised else reg(x)


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
@pytest.mark.parametrize("case,target", NONFINITE_COMBOS, ids=_ids)
def test_other_regularizers_nonfinite_raise_names_where(case, target, bad_value):
    name, fault, n, where, _ = case
    g = torch.Generator().manual_seed(3)
    model, x, reg = _other(name, target, generator=g)  # nonfinite="raise" is the default
    assert reg.nonfinite == "raise"
    _fault(model, fault, n, bad_value)
    before = snapshot(model, generator=g)
    cls = type(reg).__name__
    with pytest.raises(FloatingPointError, match=rf"^{cls}: non-finite value \(NaN or Inf\) in {where}"):
        _call_other(reg, x)
    assert_unchanged(before, snapshot(model, generator=g))  # weights, .grad, BN, flags, hooks, RNGs
    assert not reg._busy
    # and the regularizer still works afterwards, as one that never saw a fault: the failed call put
    # the generator back, so a fresh regularizer seeded the same draws the same directions
    model.bad_from = model.bad_grad_from = None
    torch.manual_seed(7)
    loss = _call_other(reg, x)
    torch.manual_seed(7)
    fresh = _call_other(OTHERS[name](model, {**TARGETS[target], "generator": torch.Generator().manual_seed(3)}), x)
    assert torch.isfinite(loss) and torch.equal(loss, fresh)


@pytest.mark.parametrize("case,target", NONFINITE_COMBOS, ids=_ids)
def test_other_regularizers_nonfinite_zero(case, target):
    name, fault, n, where, zeroed = case
    model, x, reg = _other(name, target, nonfinite="zero")
    model.eval()  # no dropout: the loss at a zero perturbation is exactly the loss at x
    with torch.no_grad():
        clean = F.cross_entropy(model(x), Y) if zeroed == "perturbation" else None
    _fault(model, fault, n)
    before = snapshot(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = _call_other(reg, x)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any(re.search(where, m) for m in messages), messages
    assert all(w.filename == __file__ for w in caught)  # the warning points at the caller's line
    if zeroed == "perturbation":  # a non-finite gradient: r = 0, the loss at x, with a graph
        assert messages == [m for m in messages if "using a zero perturbation for this call" in m]
        assert torch.equal(loss.detach(), clean)
        model.bad_grad_from = None
        torch.autograd.grad(loss, [p for p in model.parameters()], allow_unused=True)  # .grad untouched
    else:  # non-finite logits or penalty: a zero loss for this call
        assert "returning a zero loss for this call" in messages[-1]
        assert loss.shape == () and float(loss) == 0.0
        if n == 1 and name != "PGD-random-start":  # the pass at x failed: one warning, not two
            assert len(messages) == 1, messages
    assert_unchanged(before, snapshot(model), rng=False)


@pytest.mark.parametrize("case,target", NONFINITE_COMBOS, ids=_ids)
def test_other_regularizers_nonfinite_ignore_does_not_check(case, target):
    name, fault, n, _, _ = case
    model, x, reg = _other(name, target, nonfinite="ignore")
    _fault(model, fault, n)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = _call_other(reg, x)
    if name == "GradientPenalty-mse" and fault == "logits":
        assert torch.isfinite(loss)  # the case "raise" catches through the logits, not the penalty
    else:
        assert not torch.isfinite(loss)


@pytest.mark.parametrize("name", list(OTHERS))
def test_other_regularizers_finite_calls_are_unaffected_by_the_option(name):
    model = _model(False)
    model.eval()
    x = _inputs(False)
    losses = []
    for mode in ("raise", "zero", "ignore"):
        g = torch.Generator().manual_seed(5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            losses.append(_call_other(OTHERS[name](model, {"nonfinite": mode, "generator": g}), x))
    assert torch.isfinite(losses[0]) and float(losses[0].detach()) > 0
    assert torch.equal(losses[0], losses[1]) and torch.equal(losses[0], losses[2])


@pytest.mark.parametrize("name", ["VAT"] + list(OTHERS))
def test_nonfinite_warnings_point_at_the_caller(name):
    make = REGULARIZERS["VAT"] if name == "VAT" else OTHERS[name]
    model, x = _model(False), _inputs(False)
    reg = make(model, {"nonfinite": "zero"})
    model.bad_from = 1
    with pytest.warns(RuntimeWarning) as caught:
        _call_other(reg, x)
    assert [w.filename for w in caught] == [__file__] * len(caught)


# ------------------------------------------------------------------------------------------------
# Zero gradients: a zero-safe perturbation, never NaN
# ------------------------------------------------------------------------------------------------
class Ignores(nn.Module):
    """Reaches its input / embedding but its output does not depend on it."""

    def __init__(self, tokens):
        super().__init__()
        self.tokens = tokens
        self.emb = nn.Embedding(20, 6)
        self.bias = nn.Parameter(torch.randn(3))

    def forward(self, x):
        h = self.emb(x) if self.tokens else x
        return self.bias.expand(h.shape[0], 3) + 0.0 * h.detach().sum()


class Dead(nn.Module):
    """Depends on its input only through a ReLU that is off everywhere: gradient exactly zero."""

    def __init__(self, tokens):
        super().__init__()
        self.tokens = tokens
        self.emb = nn.Embedding(20, 6)
        self.fc = nn.Linear(6 if tokens else 5, 3)

    def forward(self, x):
        h = self.emb(x).mean(1) if self.tokens else x
        return self.fc(torch.relu(h - 1e6))


@pytest.mark.parametrize("cls", [Ignores, Dead])
@pytest.mark.parametrize("target", list(TARGETS))
def test_zero_gradient_gives_zero_perturbation(cls, target):
    tokens = target != "input"
    torch.manual_seed(0)
    model = cls(tokens)
    x = _inputs(tokens)
    vat = fastvat.VAT(model, **TARGETS[target])
    r = vat.perturbation(x)
    assert torch.count_nonzero(r) == 0 and torch.isfinite(r).all()
    loss = vat(x)
    assert torch.isfinite(loss) and float(loss.detach()) == 0.0
    for reg in (fastvat.FGM(model, loss_fn=F.cross_entropy, **TARGETS[target]),
                fastvat.PGD(model, loss_fn=F.cross_entropy, steps=2, **TARGETS[target])):
        assert torch.isfinite(reg(x, y=Y[: x.shape[0]]))
    if target != "weight":
        assert float(fastvat.GradientPenalty(model, **TARGETS[target])(x).detach()) == 0.0


class MinusInf(nn.Module):
    """A linear model whose logits are -inf where ``where(logits)`` is true."""

    def __init__(self, where):
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.where = where

    def forward(self, x):
        z = self.fc(x)
        return z.masked_fill(self.where(z), float("-inf"))


@pytest.mark.parametrize("name", ["VAT"] + list(OTHERS))
@pytest.mark.parametrize("nonfinite", ["raise", "zero"])
def test_masked_classes_with_minus_inf_are_not_an_error(nonfinite, name):
    """-inf logits mean probability 0 (a masked class): the loss is that of the same model without the
    class. NaN and +inf are errors."""
    torch.manual_seed(0)
    model = MinusInf(lambda z: torch.tensor([False, False, False, True]))  # class 3 masked
    x = torch.randn(8, 5)
    make = REGULARIZERS["VAT"] if name == "VAT" else OTHERS[name]
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = _call_other(make(model, {"nonfinite": nonfinite}), x)
    assert torch.isfinite(loss) and loss > 0
    if name == "GradientPenalty":
        return  # its estimator projects on a random vector over the classes: 4 draws here, 3 without the class
    three = nn.Linear(5, 3)
    with torch.no_grad():
        three.weight.copy_(model.fc.weight[:3])
        three.bias.copy_(model.fc.bias[:3])
    torch.set_rng_state(rng)
    torch.testing.assert_close(loss, _call_other(make(three, {"nonfinite": nonfinite}), x), rtol=1e-5, atol=1e-7)



class TokenLevel(nn.Module):
    """Per-token logits [B, T, C] that are NaN at the padding token (id 0), as a model may leave them
    (``nan_at_padding=False``: finite there)."""

    def __init__(self, nan_at_padding=True):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.fc = nn.Linear(6, 3)
        self.nan_at_padding = nan_at_padding

    def forward(self, ids, attention_mask=None):
        z = self.fc(torch.tanh(self.emb(ids)))
        return z.masked_fill(ids[..., None] == 0, float("nan")) if self.nan_at_padding else z


@pytest.mark.parametrize("name", ["VAT", "RandomNoise", "GradientPenalty"])
@pytest.mark.parametrize("target", ["output", "weight"])
def test_nonfinite_logits_in_padding_rows_are_not_an_error(name, target):
    """Rows masked out by attention_mask are padding: garbage there is neither checked nor counted."""
    if name == "GradientPenalty" and target == "weight":
        pytest.skip("GradientPenalty has no weight target")
    torch.manual_seed(0)
    model = TokenLevel()
    ids = torch.randint(1, 20, (4, 7))
    am = torch.ones(4, 7, dtype=torch.long)
    am[:, 5:] = 0
    am[0, 2:] = 0
    ids[am == 0] = 0
    make = REGULARIZERS["VAT"] if name == "VAT" else OTHERS[name]
    reg = make(model, {"nonfinite": "raise", **TARGETS[target]})
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = reg(ids, attention_mask=am)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # the loss and its gradients are those of the same model with finite logits at the padding
    finite = TokenLevel(nan_at_padding=False)
    finite.load_state_dict(model.state_dict())
    torch.set_rng_state(rng)
    want = make(finite, {"nonfinite": "raise", **TARGETS[target]})(ids, attention_mask=am)
    want.backward()
    assert torch.equal(loss, want)
    for p, q in zip(model.parameters(), finite.parameters()):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)
    # the same NaN in a row that is not masked (a padding id the mask lets through) is an error that
    # names the clean logits
    am[1, 6] = 1
    with pytest.raises(FloatingPointError, match="clean logits|logits at x"):
        reg(ids, attention_mask=am)


@pytest.mark.parametrize("name", ["VAT"] + list(OTHERS))
def test_nonfinite_zero_loss_can_be_backpropagated_alone(name):
    model = _model(False)
    x = _inputs(False)
    model.bad_from = 1
    make = REGULARIZERS["VAT"] if name == "VAT" else OTHERS[name]
    before = snapshot(model)
    with pytest.warns(RuntimeWarning, match="zero loss"):
        loss = _call_other(make(model, {"nonfinite": "zero"}), x)
    assert float(loss.detach()) == 0.0
    loss.backward()  # a leaf that requires grad: no error, no parameter gradient changes
    assert_unchanged(before, snapshot(model), rng=False)


def test_all_minus_inf_clean_row_is_named_as_the_clean_logits():
    torch.manual_seed(0)
    model = MinusInf(lambda z: torch.arange(z.shape[0])[:, None] == 2)  # row 2: all -inf
    with pytest.raises(FloatingPointError, match="clean logits"):
        fastvat.VAT(model)(torch.randn(8, 5))
