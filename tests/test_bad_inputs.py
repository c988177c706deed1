"""Bad input gets a clear error that names the argument — raised before any state is touched.

Every case below runs against a model with state worth protecting (BatchNorm in train mode with
non-trivial running statistics, a mixed train/eval tree, existing ``.grad``, user hooks) and checks,
bit for bit with tests/_state.py, that weights, ``.grad``, buffers, ``training`` flags, hooks, the
weight target's patched ``forward`` and the global RNG come out exactly as they went in.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastvat
from fastvat import ops
from fastvat.inplace import ExactPerturbation

from _state import assert_unchanged, snapshot
from models import mlp

pytestmark = pytest.mark.usefixtures("one_thread")

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a GPU")


class Text(nn.Module):
    """ids -> embedding -> mean -> BatchNorm -> linear; a user hook on the embedding."""

    def __init__(self, vocab=20, dim=4, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.bn = nn.BatchNorm1d(dim)
        self.fc = nn.Linear(dim, classes)

    def forward(self, input_ids, attention_mask=None):
        return self.fc(self.bn(self.emb(input_ids).mean(1)))


class MLP(nn.Module):
    """x [N, 5] -> linear -> BatchNorm -> tanh -> linear: 3 logits."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x))


class Returns(nn.Module):
    """A model whose output is whatever `make(h)` builds from its hidden features."""

    def __init__(self, make):
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.make = make

    def forward(self, x):
        return self.make(self.fc(x))


class Unused(nn.Module):
    """Has an embedding its forward never calls."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 4)
        self.fc = nn.Linear(6, 3)

    def forward(self, input_ids):
        return self.fc(input_ids.float())


def _lived_in(model, *inputs):
    """Give the model state to lose: BN statistics, .grad, a mixed train/eval tree, user hooks."""
    model.train()
    model(*inputs).sum().backward()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.eval()  # a mixed tree must survive too
            break
    first = next(m for m in model.modules() if m is not model)
    first.register_forward_hook(lambda mod, i, o: None)
    first.register_forward_pre_hook(lambda mod, i: None)
    return model


class Segmenter(nn.Module):
    """[N, 2, H, W] -> conv -> BatchNorm -> conv: [N, 3, H, W] per-pixel logits."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh())
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.head(self.body(x))


def _segmenter():
    torch.manual_seed(0)
    return _lived_in(Segmenter(), torch.randn(2, 2, 4, 5))


def _text():
    torch.manual_seed(0)
    return _lived_in(Text(), torch.randint(0, 20, (4, 6)))


def _bn_mlp():
    torch.manual_seed(0)
    return _lived_in(MLP(), torch.randn(4, 5))


IDS = lambda: torch.randint(0, 20, (4, 6), generator=torch.Generator().manual_seed(1))  # noqa: E731
X = lambda: torch.randn(4, 5, generator=torch.Generator().manual_seed(1))  # noqa: E731
Y = lambda: torch.tensor([0, 1, 2, 0])  # noqa: E731


# ------------------------------------------------------------------------------------------------
# The matrix. Each builder returns (model or None, the tensors the call takes, the call, exception,
# a regex the message must match — the name of the offending argument). Inputs are built before the
# snapshot so that building them does not count as the call touching the RNG.
# ------------------------------------------------------------------------------------------------
def _op(fn, exc, match, **tensors):
    return None, tensors, (lambda: fn(**tensors)), exc, match


CASES = {
    # --- fastvat.ops: dtypes ---
    "l2_normalize/int x": lambda: _op(lambda x: ops.l2_normalize(x), TypeError, r"^x must be a floating",
                                      x=torch.ones(3, 4, dtype=torch.int64)),
    "l2_normalize/bool x": lambda: _op(lambda x: ops.l2_normalize(x), TypeError, r"^x must be a floating",
                                       x=torch.ones(3, 4, dtype=torch.bool)),
    "l2_normalize/x not a tensor": lambda: (None, {}, lambda: ops.l2_normalize([1.0, 2.0]), TypeError,
                                            r"^x must be a torch.Tensor"),
    "perturb_/int weight": lambda: _op(lambda w, d: ops.perturb_(w, d, scale=1.0), TypeError, r"^weight must be",
                                       w=torch.ones(5, 3, dtype=torch.int32), d=torch.randn(5, 3)),
    "perturb_/previous dtype": lambda: _op(lambda w, d, p: ops.perturb_(w, d, scale=1.0, previous=p), TypeError,
                                           r"^previous must have weight's dtype",
                                           w=torch.randn(5, 3), d=torch.randn(5, 3),
                                           p=torch.zeros(5, 3, dtype=torch.float64)),
    "kl_div/int logits": lambda: _op(lambda p, q: ops.kl_div_with_logits(p, q), TypeError, r"^p_logits must be",
                                     p=torch.ones(4, 3, dtype=torch.int64), q=torch.randn(4, 3)),
    "kl_div/no classes": lambda: _op(lambda p, q: ops.kl_div_with_logits(p, q), ValueError,
                                     r"^q_logits has no classes: shape \(4, 0\)",
                                     p=torch.randn(4, 0), q=torch.randn(4, 0)),
    "perturb_/weight and direction overlap": lambda: (lambda buf: _op(
        lambda b: ops.perturb_(b[:-1], b[1:], scale=1.0), ValueError, r"^weight and direction partially overlap",
        b=buf))(torch.randn(6, 3)),
    "perturb_/out is weight": lambda: _op(lambda w, d: ops.perturb_(w, d, scale=1.0, out=w), ValueError,
                                          r"^weight and out are the same memory",
                                          w=torch.randn(5, 3), d=torch.randn(5, 3)),
    "gather_add/float ids": lambda: _op(lambda w, i, d, di: ops.embedding_gather_add(w, i, d, di), TypeError,
                                        r"^ids must be an int32 or int64", w=torch.randn(6, 3),
                                        i=torch.ones(2, dtype=torch.float32), d=torch.randn(1, 3),
                                        di=torch.zeros(2, dtype=torch.long)),
    "gather_add/delta dtype": lambda: _op(lambda w, i, d, di: ops.embedding_gather_add(w, i, d, di), TypeError,
                                          r"^delta must have weight's dtype", w=torch.randn(6, 3),
                                          i=torch.tensor([1, 2]), d=torch.randn(1, 3, dtype=torch.float64),
                                          di=torch.zeros(2, dtype=torch.long)),
    # --- fastvat.ops: devices (meta stands in for a second device on CPU-only machines) ---
    "l2_normalize/mask on another device": lambda: _op(lambda x, m: ops.l2_normalize(x, mask=m), ValueError,
                                                       r"^mask is on meta but x is on cpu",
                                                       x=torch.randn(3, 4), m=torch.ones(3, device="meta")),
    "l2_normalize/baseline on another device": lambda: _op(lambda x, b: ops.l2_normalize(x, baseline=b),
                                                           ValueError, r"^baseline is on meta",
                                                           x=torch.randn(3, 4), b=torch.randn(3, 4, device="meta")),
    "perturb_/direction on another device": lambda: _op(lambda w, d: ops.perturb_(w, d, scale=1.0), ValueError,
                                                        r"^direction is on meta", w=torch.randn(5, 3),
                                                        d=torch.randn(5, 3, device="meta")),
    "kl_div/p on another device": lambda: _op(lambda p, q: ops.kl_div_with_logits(p, q), ValueError,
                                              r"^p_logits is on meta", p=torch.randn(4, 3, device="meta"),
                                              q=torch.randn(4, 3)),
    "gather_add/ids on another device": lambda: _op(lambda w, i, d, di: ops.embedding_gather_add(w, i, d, di),
                                                    ValueError, r"^ids is on meta", w=torch.randn(6, 3),
                                                    i=torch.tensor([1, 2], device="meta"), d=torch.randn(1, 3),
                                                    di=torch.zeros(2, dtype=torch.long)),
    # --- fastvat.ops: shapes and masks ---
    "l2_normalize/mask does not broadcast": lambda: _op(lambda x, m: ops.l2_normalize(x, mask=m), ValueError,
                                                        r"^mask of shape \(3, 5\) does not broadcast",
                                                        x=torch.randn(4, 5, 2), m=torch.ones(3, 5)),
    "l2_normalize/mask has too many dims": lambda: _op(lambda x, m: ops.l2_normalize(x, mask=m), ValueError,
                                                       r"^mask has 3 dims but x has 2",
                                                       x=torch.randn(4, 5), m=torch.ones(4, 5, 1)),
    "l2_normalize/float mask of odd dtype": lambda: _op(lambda x, m: ops.l2_normalize(x, mask=m), TypeError,
                                                        r"^mask must be bool or 0/1 numbers",
                                                        x=torch.randn(4, 5), m=torch.ones(4, dtype=torch.complex64)),
    "l2_normalize/baseline shape": lambda: _op(lambda x, b: ops.l2_normalize(x, baseline=b), ValueError,
                                               r"^baseline has shape \(3, 5\) but x has shape \(3, 4\)",
                                               x=torch.randn(3, 4), b=torch.randn(3, 5)),
    "l2_normalize/0-dim x, sample norm": lambda: _op(lambda x: ops.l2_normalize(x, norm="sample"), ValueError,
                                                     r"^x must have at least one dim", x=torch.tensor(2.0)),
    "perturb_/direction shape": lambda: _op(lambda w, d: ops.perturb_(w, d, scale=1.0), ValueError,
                                            r"^direction has shape", w=torch.randn(5, 3), d=torch.randn(3, 5)),
    "restore_/previous shape": lambda: _op(lambda w, p: ops.restore_(w, p), ValueError, r"^previous has shape",
                                           w=torch.randn(5, 3), p=torch.randn(5, 4)),
    "kl_div/shape mismatch": lambda: _op(lambda p, q: ops.kl_div_with_logits(p, q), ValueError,
                                         r"^p_logits has shape \(4, 3\) but q_logits has shape \(4, 2\)",
                                         p=torch.randn(4, 3), q=torch.randn(4, 2)),
    "kl_div/0-dim logits": lambda: _op(lambda p, q: ops.kl_div_with_logits(p, q), ValueError,
                                       r"^q_logits must have a class dim", p=torch.tensor(1.0), q=torch.tensor(1.0)),
    "kl_div/mask does not broadcast": lambda: _op(lambda p, q, m: ops.kl_div_with_logits(p, q, mask=m),
                                                  ValueError, r"^mask of shape \(3,\) does not broadcast",
                                                  p=torch.randn(4, 3), q=torch.randn(4, 3), m=torch.ones(3)),
    "kl_div/mask over the class dim": lambda: _op(lambda p, q, m: ops.kl_div_with_logits(p, q, mask=m),
                                                  ValueError, r"^mask has 2 dims but q_logits has 1 leading",
                                                  p=torch.randn(4, 3), q=torch.randn(4, 3), m=torch.ones(4, 3)),
    "gather_add/weight not 2-D": lambda: _op(lambda w, i, d, di: ops.embedding_gather_add(w, i, d, di),
                                             ValueError, r"^weight must be 2-D", w=torch.randn(6, 3, 1),
                                             i=torch.tensor([1, 2]), d=torch.randn(1, 3),
                                             di=torch.zeros(2, dtype=torch.long)),
    "gather_add/delta width": lambda: _op(lambda w, i, d, di: ops.embedding_gather_add(w, i, d, di), ValueError,
                                          r"^delta must be 2-D \[rows, 3\]", w=torch.randn(6, 3),
                                          i=torch.tensor([1, 2]), d=torch.randn(1, 4),
                                          di=torch.zeros(2, dtype=torch.long)),
    "gather_add/delta_index shape": lambda: _op(lambda w, i, d, di: ops.embedding_gather_add(w, i, d, di),
                                                ValueError, r"^delta_index has shape \(3,\) but ids",
                                                w=torch.randn(6, 3), i=torch.tensor([1, 2]), d=torch.randn(1, 3),
                                                di=torch.zeros(3, dtype=torch.long)),
    # --- fastvat.ops: token ids out of range ---
    "gather_add/ids too large": lambda: _op(lambda w, i, d, di: ops.embedding_gather_add(w, i, d, di), ValueError,
                                            r"^ids must lie in \[0, 6\).*\[1, 6\]", w=torch.randn(6, 3),
                                            i=torch.tensor([1, 6]), d=torch.randn(2, 3), di=torch.tensor([0, 1])),
    "gather_add/negative ids": lambda: _op(lambda w, i, d, di: ops.embedding_gather_add(w, i, d, di), ValueError,
                                           r"^ids must lie in \[0, 6\)", w=torch.randn(6, 3),
                                           i=torch.tensor([-1, 2]), d=torch.randn(2, 3), di=torch.tensor([0, 1])),
    "gather_add/delta_index too large": lambda: _op(lambda w, i, d, di: ops.embedding_gather_add(w, i, d, di),
                                                    ValueError, r"^delta_index must lie in \[0, 2\)",
                                                    w=torch.randn(6, 3), i=torch.tensor([1, 2]),
                                                    d=torch.randn(2, 3), di=torch.tensor([0, 2])),
    # --- fastvat.ops: unknown strings, non-finite numbers ---
    "l2_normalize/unknown norm": lambda: _op(lambda x: ops.l2_normalize(x, norm="l2"), ValueError,
                                             r"^norm must be one of 'global', 'sample', 'token'; got 'l2'",
                                             x=torch.randn(3, 4)),
    "l2_normalize/scale nan": lambda: _op(lambda x: ops.l2_normalize(x, scale=math.nan), ValueError,
                                          r"^scale must be finite", x=torch.randn(3, 4)),
    "l2_normalize/scale as tensor": lambda: _op(lambda x: ops.l2_normalize(x, scale=torch.tensor(2.0)), TypeError,
                                                r"^scale must be a Python number", x=torch.randn(3, 4)),
    "perturb_/scale inf": lambda: _op(lambda w, d: ops.perturb_(w, d, scale=math.inf), ValueError,
                                      r"^scale must be finite", w=torch.randn(5, 3), d=torch.randn(5, 3)),
    "perturb_/leaf that requires grad": lambda: _op(lambda w, d: ops.perturb_(w, d, scale=1.0), ValueError,
                                                    r"^weight is a leaf tensor that requires grad",
                                                    w=nn.Parameter(torch.randn(5, 3)), d=torch.randn(5, 3)),
    "kl_div/unknown reduction": lambda: _op(lambda p, q: ops.kl_div_with_logits(p, q, reduction="avg"), ValueError,
                                            r"^reduction must be one of", p=torch.randn(4, 3), q=torch.randn(4, 3)),
    # --- fastvat.inplace.ExactPerturbation ---
    "ExactPerturbation/int weight": lambda: _op(lambda w: ExactPerturbation(w), TypeError, r"^weight must be a floating",
                                                w=torch.ones(5, 3, dtype=torch.int64)),
    "ExactPerturbation.apply/direction shape": lambda: _op(
        lambda w, d: ExactPerturbation(w).apply(d, scale=1.0), ValueError, r"^direction has shape \(3, 5\)",
        w=torch.randn(5, 3), d=torch.randn(3, 5)),
    "ExactPerturbation.apply/bool direction": lambda: _op(
        lambda w, d: ExactPerturbation(w).apply(d, scale=1.0), TypeError, r"^direction must be a floating",
        w=torch.randn(5, 3), d=torch.ones(5, 3, dtype=torch.bool)),
    "ExactPerturbation.apply/direction on another device": lambda: _op(
        lambda w, d: ExactPerturbation(w).apply(d, scale=1.0), ValueError, r"^direction is on meta",
        w=torch.randn(5, 3), d=torch.randn(5, 3, device="meta")),
    "ExactPerturbation.apply/scale nan": lambda: _op(
        lambda w, d: ExactPerturbation(w).apply(d, scale=math.nan), ValueError, r"^scale must be finite",
        w=torch.randn(5, 3), d=torch.randn(5, 3)),
    "ExactPerturbation.restore/nothing applied": lambda: _op(
        lambda w: ExactPerturbation(w).restore(), RuntimeError, r"restore\(\) called with no perturbation applied",
        w=torch.randn(5, 3)),
}


def _model_case(model, call, exc, match, **tensors):
    return model, tensors, call, exc, match


def _user_cases():
    c = {}
    # --- constructors: unknown strings ---
    c["VAT/unknown norm"] = lambda: (lambda m: _model_case(m, lambda: fastvat.VAT(m, norm="l2"), ValueError,
                                                           r"^norm must be one of"))(_bn_mlp())
    c["VAT/unknown target"] = lambda: (lambda m: _model_case(m, lambda: fastvat.VAT(m, m.emb, target="logits"),
                                                             ValueError, r"^target must be one of"))(_text())
    c["VAT/unknown nonfinite"] = lambda: (lambda m: _model_case(m, lambda: fastvat.VAT(m, nonfinite="nan"),
                                                                ValueError, r"^nonfinite must be one of"))(_bn_mlp())
    for cls, make in [("RandomNoise", lambda m, nf: fastvat.RandomNoise(m, nonfinite=nf)),
                      ("GradientPenalty", lambda m, nf: fastvat.GradientPenalty(m, nonfinite=nf)),
                      ("FGM", lambda m, nf: fastvat.FGM(m, loss_fn=F.cross_entropy, nonfinite=nf)),
                      ("PGD", lambda m, nf: fastvat.PGD(m, loss_fn=F.cross_entropy, nonfinite=nf))]:
        for nf in ("nan", None):
            c[f"{cls}/nonfinite={nf!r}"] = (lambda make, nf: lambda: (lambda m: _model_case(
                m, lambda: make(m, nf), ValueError,
                rf"^nonfinite must be one of 'raise', 'zero', 'ignore'; got {nf!r}$"))(_bn_mlp()))(make, nf)
    c["VAT/weight target, sample norm"] = lambda: (lambda m: _model_case(
        m, lambda: fastvat.VAT(m, m.emb, target="weight", norm="sample"), ValueError,
        r"^norm must be one of 'global', 'token'"))(_text())
    c["GradientPenalty/unknown form"] = lambda: (lambda m: _model_case(
        m, lambda: fastvat.GradientPenalty(m, form="l1"), ValueError, r"^form must be one of"))(_bn_mlp())
    c["GradientPenalty/unknown estimator"] = lambda: (lambda m: _model_case(
        m, lambda: fastvat.GradientPenalty(m, estimator="hutch"), ValueError, r"^estimator must be one of"))(_bn_mlp())
    c["GradientPenalty/weight target"] = lambda: (lambda m: _model_case(
        m, lambda: fastvat.GradientPenalty(m, m.emb, target="weight"), ValueError, r"^target 'weight'"))(_text())
    # --- constructors: numbers ---
    for name, kw, exc, match in [
        ("eps=0", {"eps": 0}, ValueError, r"^eps must be > 0"),
        ("eps=nan", {"eps": math.nan}, ValueError, r"^eps must be finite"),
        ("eps=-inf", {"eps": -math.inf}, ValueError, r"^eps must be finite"),
        ("eps as a string", {"eps": "1"}, TypeError, r"^eps must be a real number"),
        ("xi=-1", {"xi": -1}, ValueError, r"^xi must be > 0"),
        ("xi=True", {"xi": True}, TypeError, r"^xi must be a real number"),
        ("iters=-1", {"iters": -1}, ValueError, r"^iters must be >= 0"),
        ("iters=1.5", {"iters": 1.5}, TypeError, r"^iters must be an int"),
    ]:
        c[f"VAT/{name}"] = (lambda kw, exc, match: lambda: (lambda m: _model_case(
            m, lambda: fastvat.VAT(m, **kw), exc, match))(_bn_mlp()))(kw, exc, match)
    c["VAT/class_dim as a string"] = lambda: (lambda m: _model_case(
        m, lambda: fastvat.VAT(m, class_dim="1"), TypeError, r"^class_dim must be an int"))(_bn_mlp())
    c["RandomNoise/class_dim=True"] = lambda: (lambda m: _model_case(
        m, lambda: fastvat.RandomNoise(m, class_dim=True), TypeError, r"^class_dim must be an int"))(_bn_mlp())
    c["GradientPenalty/class_dim=1.0"] = lambda: (lambda m: _model_case(
        m, lambda: fastvat.GradientPenalty(m, class_dim=1.0), TypeError, r"^class_dim must be an int"))(_bn_mlp())
    c["VATLoss/class_dim as a string"] = lambda: (None, {}, lambda: fastvat.VATLoss(class_dim="1"), TypeError,
                                                  r"^class_dim must be an int")
    for cls, make in [("VAT", fastvat.VAT), ("RandomNoise", fastvat.RandomNoise),
                      ("GradientPenalty", fastvat.GradientPenalty)]:
        c[f"{cls}/class_dim=0 (the batch dim)"] = (lambda make: lambda: (lambda m: _model_case(
            m, lambda: make(m, class_dim=0), ValueError, r"^class_dim=0 names the batch dim"))(_bn_mlp()))(make)
    c["VATLoss/class_dim=0 (the batch dim)"] = lambda: (None, {}, lambda: fastvat.VATLoss(class_dim=0), ValueError,
                                                        r"^class_dim=0 names the batch dim")
    c["VATLoss/eps=0"] = lambda: (None, {}, lambda: fastvat.VATLoss(eps=0), ValueError, r"^eps must be > 0")
    c["VATLoss/ip=-1"] = lambda: (None, {}, lambda: fastvat.VATLoss(ip=-1), ValueError, r"^ip must be >= 0")
    c["RandomNoise/k=0"] = lambda: (lambda m: _model_case(m, lambda: fastvat.RandomNoise(m, k=0), ValueError,
                                                          r"^k must be >= 1"))(_bn_mlp())
    c["RandomNoise/sigma=nan"] = lambda: (lambda m: _model_case(
        m, lambda: fastvat.RandomNoise(m, sigma=math.nan), ValueError, r"^sigma must be finite"))(_bn_mlp())
    c["RandomNoise/loss_fn not callable"] = lambda: (lambda m: _model_case(
        m, lambda: fastvat.RandomNoise(m, loss_fn=3), TypeError, r"^loss_fn must be callable"))(_bn_mlp())
    c["GradientPenalty/samples=0"] = lambda: (lambda m: _model_case(
        m, lambda: fastvat.GradientPenalty(m, samples=0), ValueError, r"^samples must be >= 1"))(_bn_mlp())
    c["FGM/eps=0"] = lambda: (lambda m: _model_case(m, lambda: fastvat.FGM(m, loss_fn=F.cross_entropy, eps=0), ValueError,
                                                    r"^eps must be > 0"))(_bn_mlp())
    c["FGM/loss_fn not callable"] = lambda: (lambda m: _model_case(m, lambda: fastvat.FGM(m, loss_fn="ce"), TypeError,
                                                                   r"^loss_fn must be callable"))(_bn_mlp())
    c["PGD/steps=0"] = lambda: (lambda m: _model_case(m, lambda: fastvat.PGD(m, loss_fn=F.cross_entropy, steps=0),
                                                      ValueError, r"^steps must be >= 1"))(_bn_mlp())
    c["PGD/steps=1.5"] = lambda: (lambda m: _model_case(m, lambda: fastvat.PGD(m, loss_fn=F.cross_entropy, steps=1.5),
                                                        TypeError, r"^steps must be an int"))(_bn_mlp())
    c["PGD/alpha=nan"] = lambda: (lambda m: _model_case(m, lambda: fastvat.PGD(m, loss_fn=F.cross_entropy, alpha=math.nan),
                                                        ValueError, r"^alpha must be finite"))(_bn_mlp())
    # --- constructors: booleans (one check, _checks.flag, for every flag: "no" is not False) ---
    for name, build in [
        ("PGD/random_start='no'", lambda m: fastvat.PGD(m, loss_fn=F.cross_entropy, random_start="no")),
        ("RandomNoise/symmetric=1", lambda m: fastvat.RandomNoise(m, symmetric=1)),
        ("VAT/drop_labels='yes'", lambda m: fastvat.VAT(m, drop_labels="yes")),
        ("GradientPenalty/drop_labels=None", lambda m: fastvat.GradientPenalty(m, drop_labels=None)),
    ]:
        flag = name.split("/")[1].split("=")[0]
        c[name] = (lambda build, flag: lambda: (lambda m: _model_case(
            m, lambda: build(m), TypeError, rf"^{flag} must be True or False, got"))(_bn_mlp()))(build, flag)
    # --- constructors: the old FGM/PGD order (model, loss_fn, ...) is refused with the new one named ---
    for cls in ("FGM", "PGD"):
        c[f"{cls}/loss_fn passed positionally"] = (lambda cls: lambda: (lambda m: _model_case(
            m, lambda: getattr(fastvat, cls)(m, F.cross_entropy), TypeError,
            rf"^{cls}: embedding \(the second positional argument\).*by keyword: loss_fn="))(_text()))(cls)
    c["FGM/loss module passed positionally"] = lambda: (lambda m: _model_case(
        m, lambda: fastvat.FGM(m, nn.CrossEntropyLoss()), TypeError,
        r"^FGM: embedding .*got CrossEntropyLoss\(\)"))(_text())
    c["VAT/loss_fn positionally"] = lambda: (lambda m: _model_case(
        m, lambda: fastvat.VAT(m, F.mse_loss), TypeError, r"^VAT: embedding \(the second positional"))(_text())
    # --- constructors: model, embedding, target, generator ---
    c["VAT/model not a module"] = lambda: (None, {}, lambda: fastvat.VAT(lambda x: x), TypeError,
                                           r"^model must be an nn.Module")
    c["VAT/embedding not an embedding"] = lambda: (lambda m: _model_case(
        m, lambda: fastvat.VAT(m, embedding=m.fc), TypeError, r"^embedding must be an nn.Embedding"))(_text())
    c["VAT/embedding name not found"] = lambda: (lambda m: _model_case(
        m, lambda: fastvat.VAT(m, embedding="encoder.word_embeddings"), ValueError,
        r"^embedding 'encoder.word_embeddings' is not a submodule.*\['emb'\]"))(_text())
    c["VAT/embedding of another model"] = lambda: (lambda m, other: _model_case(
        m, lambda: fastvat.VAT(m, embedding=other), ValueError,
        r"^embedding is not a submodule of the model"))(_text(), nn.Embedding(20, 4))
    c["VAT/embedding of the wrong type"] = lambda: (lambda m: _model_case(
        m, lambda: fastvat.VAT(m, embedding=3), TypeError, r"^embedding must be an nn.Embedding"))(_text())
    c["VAT/weight target without embedding"] = lambda: (lambda m: _model_case(
        m, lambda: fastvat.VAT(m, target="weight"), ValueError, r"^target 'weight' needs embedding="))(_text())
    c["VAT/input target with embedding"] = lambda: (lambda m: _model_case(
        m, lambda: fastvat.VAT(m, m.emb, target="input"), ValueError, r"^target 'input'.*embedding="))(_text())
    c["VAT/generator not a Generator"] = lambda: (lambda m: _model_case(
        m, lambda: fastvat.VAT(m, generator=0), TypeError, r"^generator must be a torch.Generator"))(_bn_mlp())

    # --- calls ---
    def vat_call(make_model, reg_kwargs, args, kwargs, exc, match, cls=None):
        def build():
            m = make_model()
            a = tuple(f() if callable(f) else f for f in args)
            kw = {k: (f() if callable(f) else f) for k, f in kwargs.items()}
            ctor = cls or fastvat.VAT
            reg = ctor(m, **reg_kwargs)
            tensors = {f"arg{i}": t for i, t in enumerate(a) if isinstance(t, torch.Tensor)}
            tensors.update({k: t for k, t in kw.items() if isinstance(t, torch.Tensor)})
            return m, tensors, (lambda: reg(*a, **kw)), exc, match
        return build

    emb = {"embedding": "emb"}  # by dotted name
    wemb = {"embedding": "emb", "target": "weight"}
    c["VAT(x)/bool input"] = vat_call(_bn_mlp, {}, [lambda: torch.ones(4, 5, dtype=torch.bool)], {}, TypeError,
                                      r"^target 'input' needs a floating-point tensor as the first positional")
    c["VAT(x)/int input"] = vat_call(_bn_mlp, {}, [lambda: torch.ones(4, 5, dtype=torch.long)], {}, TypeError,
                                     r"^target 'input' needs a floating-point tensor as the first positional")
    c["VAT(x)/no input"] = vat_call(_bn_mlp, {}, [], {}, ValueError, r"^target 'input' perturbs the first positional")
    c["VATLoss/int input"] = lambda: (lambda m, x: (m, {"x": x}, lambda: fastvat.VATLoss()(m, x), TypeError,
                                                    r"first positional argument"))(
        _bn_mlp(), torch.ones(4, 5, dtype=torch.long))
    c["VAT(x)/logits of the wrong shape"] = vat_call(_bn_mlp, {}, [X], {"logits": lambda: torch.randn(4, 7)},
                                                     ValueError, r"^logits has shape \(4, 7\) but the model returned")
    c["VAT(x)/logits on another device"] = vat_call(_bn_mlp, {}, [X],
                                                    {"logits": lambda: torch.randn(4, 3, device="meta")},
                                                    ValueError, r"^logits is on meta but the model's logits are on cpu")
    c["VAT(x)/integer logits"] = vat_call(_bn_mlp, {}, [X], {"logits": lambda: torch.ones(4, 3, dtype=torch.long)},
                                          TypeError, r"^logits must be a floating-point tensor")
    c["VAT(ids)/weight: ids too large"] = vat_call(_text, wemb, [lambda: torch.full((4, 6), 20)], {}, ValueError,
                                                   r"^token ids must lie in \[0, 20\).*\[20, 20\]")
    c["VAT(ids)/weight: negative ids"] = vat_call(_text, wemb, [lambda: torch.full((4, 6), -2)], {}, ValueError,
                                                  r"^token ids must lie in \[0, 20\)")
    c["VAT(ids)/weight: ids too large, logits given"] = vat_call(
        _text, wemb, [lambda: torch.full((4, 6), 25)], {"logits": lambda: torch.randn(4, 3)}, ValueError,
        r"^token ids must lie in \[0, 20\)")
    c["VAT(ids)/weight: float ids"] = vat_call(_text, wemb, [lambda: torch.ones(4, 6)], {}, TypeError,
                                               r"^the embedding's input must be integer token ids")
    c["VAT(ids)/output: attention_mask of the wrong shape"] = vat_call(
        _text, emb, [IDS], {"attention_mask": lambda: torch.ones(4, 5)}, ValueError,
        r"^attention_mask of shape \(4, 5\) does not match")
    c["VAT/model returns a string"] = vat_call(lambda: Returns(lambda h: "logits"), {}, [X], {}, TypeError,
                                               r"^cannot find logits in the model's output.*got str")
    c["VAT/model returns a dict without logits"] = vat_call(lambda: Returns(lambda h: {"scores": h}), {}, [X], {},
                                                            TypeError, r"^cannot find logits.*got dict")
    c["VAT/model returns integer logits"] = vat_call(lambda: Returns(lambda h: h.long()), {}, [X], {}, TypeError,
                                                     r"^the logits in the model's output must be a floating")
    c["VAT/model returns 0-dim logits"] = vat_call(lambda: Returns(lambda h: h.sum()), {}, [X], {}, ValueError,
                                                   r"^the logits in the model's output are a 0-dim tensor")
    seg = lambda: torch.randn(2, 2, 4, 5, generator=torch.Generator().manual_seed(1))  # noqa: E731
    c["VAT/4-D logits without class_dim"] = vat_call(
        _segmenter, {}, [seg], {}, ValueError, r"^the model's logits have 4 dims \(shape \(2, 3, 4, 5\)\).*class_dim=1")
    c["VAT/4-D logits= without class_dim"] = vat_call(
        _segmenter, {}, [seg], {"logits": lambda: torch.randn(2, 3, 4, 5)}, ValueError,
        r"^the logits passed as logits= have 4 dims")
    c["RandomNoise/4-D logits without class_dim"] = vat_call(_segmenter, {}, [seg], {}, ValueError,
                                                             r"4 dims.*class_dim=", cls=fastvat.RandomNoise)
    c["GradientPenalty/4-D logits without class_dim"] = vat_call(_segmenter, {}, [seg], {}, ValueError,
                                                                 r"4 dims.*class_dim=", cls=fastvat.GradientPenalty)
    c["VAT/class_dim out of range"] = vat_call(
        _segmenter, {"class_dim": 4}, [seg], {}, ValueError,
        r"^class_dim=4 is out of range for the model's logits of shape \(2, 3, 4, 5\)")
    c["VAT/class_dim out of range, negative"] = vat_call(_bn_mlp, {"class_dim": -3}, [X], {}, ValueError,
                                                         r"^class_dim=-3 is out of range")
    c["VAT/class_dim=-2 of [N, C] logits (the batch dim)"] = vat_call(
        _bn_mlp, {"class_dim": -2}, [X], {}, ValueError,
        r"^class_dim=-2 names dim 0 of the model's logits of shape \(4, 3\), the batch dim")
    c["GradientPenalty/class_dim=-4 of [N, C, H, W] logits"] = vat_call(
        _segmenter, {"class_dim": -4}, [seg], {}, ValueError, r"^class_dim=-4 names dim 0", cls=fastvat.GradientPenalty)
    c["VATLoss/4-D logits without class_dim"] = lambda: (lambda m, x: (m, {"x": x}, lambda: fastvat.VATLoss()(m, x),
                                                                       ValueError, r"4 dims.*class_dim="))(
        _segmenter(), seg())
    c["VAT(ids)/output: embedding never called"] = vat_call(Unused, emb, [IDS], {}, ValueError,
                                                            r"never called the embedding passed as embedding=")
    c["VAT(ids)/weight: embedding never called"] = vat_call(Unused, wemb, [IDS], {}, ValueError,
                                                            r"never called the embedding passed as embedding=")
    c["FGM/embedding never called"] = vat_call(Unused, {"loss_fn": F.cross_entropy, **emb}, [IDS], {"y": Y},
                                               ValueError, r"never called the embedding", cls=fastvat.FGM)
    c["FGM/no y"] = vat_call(_bn_mlp, {"loss_fn": F.cross_entropy}, [X], {}, ValueError, r"^y \(the targets",
                             cls=fastvat.FGM)
    c["PGD/no y"] = vat_call(_bn_mlp, {"loss_fn": F.cross_entropy}, [X], {}, ValueError, r"^y \(the targets",
                             cls=fastvat.PGD)
    c["FGM/model without .loss"] = vat_call(_bn_mlp, {}, [X], {}, TypeError, r"^loss_fn is None, so the model's output",
                                            cls=fastvat.FGM)
    c["RandomNoise/loss_fn without y"] = vat_call(_bn_mlp, {"loss_fn": F.cross_entropy}, [X], {}, ValueError,
                                                  r"^y \(the targets for loss_fn\)", cls=fastvat.RandomNoise)
    c["RandomNoise/bool input"] = vat_call(_bn_mlp, {}, [lambda: torch.ones(4, 5, dtype=torch.bool)], {}, TypeError,
                                           r"^target 'input' needs a floating-point", cls=fastvat.RandomNoise)
    c["GradientPenalty/int input"] = vat_call(_bn_mlp, {}, [lambda: torch.ones(4, 5, dtype=torch.int32)], {}, TypeError,
                                              r"^target 'input' needs a floating-point", cls=fastvat.GradientPenalty)
    c["PGD/weight: ids too large"] = vat_call(_text, {"loss_fn": F.cross_entropy, **wemb},
                                              [lambda: torch.full((4, 6), 99)], {"y": Y}, ValueError,
                                              r"^token ids must lie in \[0, 20\)", cls=fastvat.PGD)
    return c


CASES.update(_user_cases())


def _cuda_cases():
    c = {
        "l2_normalize/mask on cpu, x on cuda": lambda: _op(
            lambda x, m: ops.l2_normalize(x, mask=m), ValueError, r"^mask is on cpu but x is on cuda",
            x=torch.randn(3, 4, device="cuda"), m=torch.ones(3)),
        "perturb_/direction on cpu, weight on cuda": lambda: _op(
            lambda w, d: ops.perturb_(w, d, scale=1.0), ValueError, r"^direction is on cpu but weight is on cuda",
            w=torch.randn(5, 3, device="cuda"), d=torch.randn(5, 3)),
        "kl_div/p on cuda, q on cpu": lambda: _op(
            lambda p, q: ops.kl_div_with_logits(p, q), ValueError, r"^p_logits is on cuda",
            p=torch.randn(4, 3, device="cuda"), q=torch.randn(4, 3)),
    }

    def vat_logits_cuda():
        m = _bn_mlp()
        x, lg = X(), torch.randn(4, 3, device="cuda")
        reg = fastvat.VAT(m)
        return m, {"x": x, "logits": lg}, (lambda: reg(x, logits=lg)), ValueError, r"^logits is on cuda"

    c["VAT(x)/logits on cuda, model on cpu"] = vat_logits_cuda
    return c


CUDA_CASES = _cuda_cases()


def test_matrix_is_large_enough():
    assert len(CASES) >= 25
    # every user-facing class and every op appears
    names = " ".join(CASES)
    for what in ("VAT/", "VAT(", "VATLoss/", "RandomNoise/", "GradientPenalty/", "FGM/", "PGD/",
                 "l2_normalize/", "perturb_/", "restore_/", "kl_div/", "gather_add/", "ExactPerturbation"):
        assert what in names, what


def _run_case(build):
    model, tensors, fn, exc, match = build()
    gen_state = torch.get_rng_state()
    before = snapshot(model, tensors=tensors)
    with pytest.raises(exc, match=match):
        fn()
    assert_unchanged(before, snapshot(model, tensors=tensors))
    assert torch.equal(gen_state, torch.get_rng_state())


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case):
    _run_case(CASES[case])


@needs_cuda
@pytest.mark.parametrize("case", sorted(CUDA_CASES))
def test_bad_input_cuda(case):
    _run_case(CUDA_CASES[case])


# ------------------------------------------------------------------------------------------------
# Empty batches: not an error. The loss is a well-defined 0 that backpropagates (zero gradients).
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["input", "output", "weight"])
def test_empty_batch_gives_zero_loss(target):
    torch.manual_seed(0)
    if target == "input":
        model = mlp((5, 8, 3), seed=None)
        inputs, reg = (torch.randn(0, 5),), fastvat.VAT(model)
    else:
        model = nn.Sequential(nn.Embedding(20, 4), nn.Flatten(), nn.Linear(24, 3))
        inputs, reg = (torch.randint(0, 20, (0, 6)),), fastvat.VAT(model, embedding="0", target=target)
    before = snapshot(model)
    loss = reg(*inputs)
    assert loss.shape == () and float(loss.detach()) == 0.0
    loss.backward()
    for p in model.parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
        p.grad = None
    assert_unchanged(before, snapshot(model), rng=False)


@pytest.mark.parametrize("reg_cls", [fastvat.RandomNoise, fastvat.GradientPenalty, fastvat.FGM, fastvat.PGD])
def test_empty_batch_other_regularizers(reg_cls):
    model = mlp((5, 8, 3), seed=None)
    if reg_cls in (fastvat.RandomNoise, fastvat.GradientPenalty):
        loss = reg_cls(model)(torch.randn(0, 5))
        assert float(loss.detach()) == 0.0
    else:
        # cross_entropy of an empty batch is NaN (mean of nothing): use a sum, well-defined 0.
        loss = reg_cls(model, loss_fn=lambda q, y: F.cross_entropy(q, y, reduction="sum"))(
            torch.randn(0, 5), y=torch.zeros(0, dtype=torch.long))
        assert float(loss.detach()) == 0.0


@pytest.mark.parametrize("reg_cls", [fastvat.FGM, fastvat.PGD])
def test_empty_batch_with_a_mean_loss_is_nonfinite(reg_cls):
    """F.cross_entropy's mean of an empty batch is NaN: nonfinite="raise" (default) says so, "ignore" returns it."""
    model = _bn_mlp()
    x, y = torch.randn(0, 5), torch.zeros(0, dtype=torch.long)
    before = snapshot(model)
    with pytest.raises(FloatingPointError, match=r"non-finite value \(NaN or Inf\) in the loss at x"):
        reg_cls(model, loss_fn=F.cross_entropy)(x, y=y)
    assert_unchanged(before, snapshot(model))
    assert torch.isnan(reg_cls(model, loss_fn=F.cross_entropy, nonfinite="ignore")(x, y=y))
