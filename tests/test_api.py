"""The public API's shape: one calling convention, one table of defaults, reprs that show every
setting, functional forms equal to the classes, lazy submodules, shipped type hints."""
import inspect
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastvat
from fastvat import _defaults
from fastvat import functional as Fv
from fastvat.inplace import ExactPerturbation

REGULARIZERS = [fastvat.VAT, fastvat.RandomNoise, fastvat.GradientPenalty, fastvat.FGM, fastvat.PGD]


class Text(nn.Module):
    def __init__(self, vocab=12, dim=4, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim, classes)

    def forward(self, ids):
        return self.fc(self.emb(ids).mean(1))


def _text():
    torch.manual_seed(0)
    return Text()


@pytest.mark.parametrize("cls", REGULARIZERS, ids=lambda c: c.__name__)
def test_one_calling_convention(cls):
    """(model, embedding=None) positional-or-keyword, every other argument keyword-only."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert [p.name for p in params[:2]] == ["model", "embedding"]
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params[:2])
    assert params[1].default is None
    assert all(p.kind is p.KEYWORD_ONLY for p in params[2:]), [p.name for p in params[2:]]


@pytest.mark.parametrize("cls", [fastvat.FGM, fastvat.PGD], ids=lambda c: c.__name__)
def test_embedding_is_the_second_positional_argument_of_fgm_and_pgd(cls):
    m = _text()
    reg = cls(m, m.emb, loss_fn=F.cross_entropy)
    assert reg.embedding is m.emb and reg.target == "output"
    loss = reg(torch.randint(0, 12, (4, 5)), y=torch.randint(0, 3, (4,)))
    assert loss.dim() == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("cls", REGULARIZERS, ids=lambda c: c.__name__)
def test_a_loss_function_in_the_embedding_slot_is_a_clear_type_error(cls):
    m = _text()
    with pytest.raises(TypeError, match=rf"^{cls.__name__}: embedding \(the second positional argument\).*"
                                        r"cross_entropy.*loss_fn="):
        cls(m, F.cross_entropy)


@pytest.mark.parametrize("cls", [fastvat.FGM, fastvat.PGD], ids=lambda c: c.__name__)
def test_the_old_three_positional_fgm_order_is_a_clear_type_error(cls):
    m = _text()
    with pytest.raises(TypeError, match=rf"^{cls.__name__} takes \(model, embedding=None\) positionally.*got 3 "
                                        r"positional arguments; a loss function goes by keyword: loss_fn="):
        cls(m, F.cross_entropy, m.emb)


def test_regularizers_still_pickle():
    import pickle

    m = _text()
    again = pickle.loads(pickle.dumps(fastvat.VAT(m, m.emb, eps=2.0)))
    assert again.eps == 2.0 and again.target == "output"
    assert pickle.loads(pickle.dumps(fastvat.VATLoss(ip=2))).ip == 2


@pytest.mark.parametrize("build", [
    lambda m, v: fastvat.PGD(m, random_start=v),
    lambda m, v: fastvat.RandomNoise(m, symmetric=v),
    lambda m, v: fastvat.VAT(m, drop_labels=v),
    lambda m, v: fastvat.RandomNoise(m, drop_labels=v),
    lambda m, v: fastvat.GradientPenalty(m, drop_labels=v),
], ids=["PGD.random_start", "RandomNoise.symmetric", "VAT.drop_labels", "RandomNoise.drop_labels",
        "GradientPenalty.drop_labels"])
@pytest.mark.parametrize("value", ["no", 0, 1, None, torch.tensor(True)], ids=repr)
def test_every_flag_takes_only_a_bool(build, value):
    with pytest.raises(TypeError, match="must be True or False"):
        build(_text(), value)


@pytest.mark.parametrize("cls, target", [(c, t) for c in REGULARIZERS for t in ("input", "output", "weight")
                                          if not (c is fastvat.GradientPenalty and t == "weight")],
                         ids=lambda v: getattr(v, "__name__", v))
def test_defaults_come_from_the_one_table(cls, target):
    m = _text()
    kw = {} if target == "input" else {"embedding": m.emb, "target": target}
    reg = cls(m, **kw)
    table = _defaults.DEFAULTS[target]
    if cls is not fastvat.GradientPenalty:  # no step size, no norm
        assert reg.eps == table["eps"] and reg.norm == table["norm"]
    if cls is fastvat.VAT:
        assert reg.xi == table["xi"]


def test_noise_is_vat_without_power_iterations_at_default_eps():
    m = _text()
    ids = torch.randint(0, 12, (4, 5))
    g = torch.Generator().manual_seed(3)
    noise = fastvat.RandomNoise(m, m.emb, generator=g)(ids)
    g.manual_seed(3)
    vat = fastvat.VAT(m, m.emb, iters=0, generator=g)(ids)
    torch.testing.assert_close(noise, vat, rtol=0, atol=0)


@pytest.mark.parametrize("reg, shown", [
    (lambda m: fastvat.VAT(m, m.emb, hvp="finite_difference", nonfinite="zero", class_dim=-1),
     ["xi=0.1", "eps=5.0", "iters=1", "hvp='finite_difference'", "target='output'", "norm='sample'",
      "nonfinite='zero'", "class_dim=-1", "head=None", "drop_labels=True", "generator=None",
      "embedding=Embedding(12, 4)", "model=<Text>"]),
    (lambda m: fastvat.RandomNoise(m, sigma=0.5, k=2, symmetric=True),
     ["sigma=0.5", "k=2", "symmetric=True", "loss_fn=None", "target='input'"]),
    (lambda m: fastvat.GradientPenalty(m, form="mse", samples=3),
     ["form='mse'", "estimator='rademacher'", "samples=3", "class_dim=None"]),
    (lambda m: fastvat.FGM(m, loss_fn=F.cross_entropy, eps=0.5),
     ["loss_fn=torch.nn.functional.cross_entropy", "eps=0.5", "nonfinite='raise'"]),
    (lambda m: fastvat.PGD(m, steps=4, alpha=0.1, random_start=True, generator=torch.Generator()),
     ["steps=4", "alpha=0.1", "random_start=True", "generator=torch.Generator(device='cpu')"]),
], ids=["VAT", "RandomNoise", "GradientPenalty", "FGM", "PGD"])
def test_repr_shows_every_setting(reg, shown):
    text = repr(reg(_text()))
    for part in shown:
        assert part in text, (part, text)


def test_vatloss_repr_shows_class_dim():
    assert repr(fastvat.VATLoss(class_dim=1)) == "VATLoss(xi=10.0, eps=1.0, ip=1, class_dim=1)"


def _same_loss(functional, build, call, **kw):
    torch.manual_seed(7)
    a = functional()
    torch.manual_seed(7)
    b = call(build())
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_functional_forms_equal_the_classes():
    m = _text()
    ids, y = torch.randint(0, 12, (4, 5)), torch.randint(0, 3, (4,))
    _same_loss(lambda: Fv.vat_loss(m, ids, embedding=m.emb, eps=2.0),
               lambda: fastvat.VAT(m, m.emb, eps=2.0), lambda r: r(ids))
    _same_loss(lambda: Fv.vat_perturbation(m, ids, embedding="emb", target="weight"),
               lambda: fastvat.VAT(m, "emb", target="weight"), lambda r: r.perturbation(ids))
    _same_loss(lambda: Fv.noise_loss(m, ids, embedding=m.emb, k=2),
               lambda: fastvat.RandomNoise(m, m.emb, k=2), lambda r: r(ids))
    _same_loss(lambda: Fv.gradient_penalty(m, ids, embedding=m.emb),
               lambda: fastvat.GradientPenalty(m, m.emb), lambda r: r(ids))
    _same_loss(lambda: Fv.fgm_loss(m, ids, y=y, embedding=m.emb, loss_fn=F.cross_entropy),
               lambda: fastvat.FGM(m, m.emb, loss_fn=F.cross_entropy), lambda r: r(ids, y=y))
    _same_loss(lambda: Fv.pgd_loss(m, ids, y=y, embedding=m.emb, loss_fn=F.cross_entropy, random_start=True),
               lambda: fastvat.PGD(m, m.emb, loss_fn=F.cross_entropy, random_start=True), lambda r: r(ids, y=y))


def test_functional_model_kwargs_reach_the_model_and_do_not_collide_with_settings():
    class TakesEps(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x, eps=None):
            assert eps == "the model's own"
            return self.fc(x)

    loss = Fv.vat_loss(TakesEps(), torch.randn(4, 3), eps=0.5, model_kwargs={"eps": "the model's own"})
    assert torch.isfinite(loss)
    with pytest.raises(TypeError, match="^model_kwargs must be a mapping"):
        Fv.vat_loss(TakesEps(), torch.randn(4, 3), model_kwargs=[("eps", 1)])


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        fastvat.nope  # noqa: B018


def test_type_hints_ship():
    root = os.path.dirname(fastvat.__file__)
    assert os.path.isfile(os.path.join(root, "py.typed"))
    pyproject = open(os.path.join(os.path.dirname(root), "pyproject.toml")).read()
    assert 'fastvat = ["py.typed"]' in pyproject


@pytest.mark.parametrize("obj", [
    fastvat.VAT, fastvat.VAT.__call__, fastvat.VAT.perturbation, fastvat.VATLoss, fastvat.VATLoss.forward,
    fastvat.RandomNoise, fastvat.RandomNoise.__call__, fastvat.GradientPenalty, fastvat.GradientPenalty.__call__,
    fastvat.FGM, fastvat.FGM.__call__, fastvat.PGD, fastvat.PGD.__call__, fastvat.extension_info,
    ExactPerturbation, ExactPerturbation.apply, ExactPerturbation.restore, ExactPerturbation.perturbed,
    fastvat.inplace.perturbed_,
    *[getattr(Fv, n) for n in Fv.__all__],
], ids=lambda o: getattr(o, "__qualname__", str(o)))
def test_public_callables_are_typed_and_documented(obj):
    doc = inspect.getdoc(obj) or ""
    if inspect.isclass(obj):
        sig_of = obj.__init__ if obj.__init__ is not object.__init__ else obj
        needed = ("Args:", "Raises:")
    else:
        sig_of = obj
        needed = ("Returns:",)
    for section in needed:
        assert section in doc, (obj, section)
    hints = {k: v for k, v in inspect.signature(sig_of).parameters.items() if k != "self"}
    assert all(p.annotation is not inspect.Parameter.empty for p in hints.values()), obj
    assert inspect.signature(sig_of).return_annotation is not inspect.Signature.empty, obj


def test_exact_perturbation_repr_and_flag():
    w = torch.zeros(3, 2)
    p = ExactPerturbation(w)
    assert repr(p) == "ExactPerturbation(weight=<(3, 2) torch.float32 on cpu>, active=False, nbytes=0)"
    p.apply(torch.ones(3, 2), scale=1.0)
    with pytest.raises(TypeError, match="^force must be True or False"):
        p.restore(force="yes")
    assert p.active  # the refused call touched nothing
    p.restore()


class _NoForwardAD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


def test_no_forward_ad_is_remembered_per_model_not_written_into_another_class():
    """VATLoss builds a VAT per call; what one learns (no forward-mode AD) is kept per model, read by
    any later VAT of that model, and is not an attribute that VATLoss sets on VAT."""
    class NoJvp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            return self.fc(_NoForwardAD.apply(x))

    model = NoJvp()
    assert not fastvat.VAT(model).exact_unavailable
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(RuntimeWarning, match="forward-mode AD"):
        fastvat.VATLoss(xi=1.0)(model, torch.randn(4, 5))
    assert fastvat.VAT(model).exact_unavailable
    assert not fastvat.VAT(NoJvp()).exact_unavailable
    with pytest.raises(AttributeError):
        fastvat.VAT(model).exact_unavailable = False
    assert not hasattr(fastvat.VATLoss(), "_no_forward_ad")
