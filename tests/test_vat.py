"""The VAT API against the math it implements: the power iteration reaches the top eigenvector of the
exact Hessian of the KL divergence (per target and norm), the weight target equals the article's dense
algorithm, the random start is chi-square distributed, and a call loses none of the model's state."""
import gc
import math
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastvat
from fastvat import reference as ref
from fastvat._targets import chi2_sample

from hessian import abs_cos, kl_sum, top_eigvec
from models import TinyText, mlp


# ------------------------------------------------------------------------------------------
# Power iteration converges to the top eigenvector of the exact Hessian of D
# ------------------------------------------------------------------------------------------
def test_input_global_converges_to_top_eigenvector():
    model = mlp((5, 16, 4), dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64)
    p = model(x).detach()
    h = torch.autograd.functional.hessian(lambda r: kl_sum(p, model(x + r.reshape(x.shape))), torch.zeros(x.numel(), dtype=x.dtype))
    v, vals = top_eigvec(h)
    assert vals[-1] > 1.05 * vals[-2]  # a spectral gap, so the power method converges
    vat = fastvat.VAT(model, xi=1e-4, eps=2.0, iters=400, norm="global", generator=torch.Generator().manual_seed(1))
    r = vat.perturbation(x)
    assert r.norm().item() == pytest.approx(2.0, rel=1e-9)
    assert abs_cos(r, v) > 0.9999


def test_input_sample_converges_per_sample():
    model = mlp((5, 16, 4), dtype=torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64)
    vat = fastvat.VAT(model, xi=1e-4, eps=0.7, iters=60, norm="sample", generator=torch.Generator().manual_seed(2))
    r = vat.perturbation(x)
    for i in range(x.shape[0]):
        xi_, pi = x[i : i + 1], model(x[i : i + 1]).detach()
        h = torch.autograd.functional.hessian(lambda z: kl_sum(pi, model(xi_ + z.reshape(1, 5))), torch.zeros(5, dtype=x.dtype))
        v, _ = top_eigvec(h)
        assert r[i].norm().item() == pytest.approx(0.7, rel=1e-9)
        assert abs_cos(r[i], v) > 0.999


@pytest.mark.parametrize("norm", ["global", "sample", "token"])
def test_embedding_output_fixed_point(norm):
    """Output target: global/sample converge to top eigenvectors; token to the per-token fixed point."""
    model = TinyText(seed=0)
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]])
    am = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    vat = fastvat.VAT(model, embedding=model.emb, xi=1e-4, eps=1.5, iters=80, norm=norm,
                      generator=torch.Generator().manual_seed(3))
    r = vat.perturbation(ids, attention_mask=am)
    assert r.shape == (2, 4, 4)
    assert torch.all(r[0, 3] == 0), "padded position must not be perturbed"
    e = model.emb(ids).detach()
    p = model(ids, attention_mask=am).detach()

    class Shift(nn.Module):
        def forward(self, flat):
            return kl_sum(p, _forward_with(flat))

    def _forward_with(flat):
        h = torch.tanh(model.fc1(e + flat.reshape(e.shape)))
        m = am.to(h.dtype).unsqueeze(-1)
        return model.fc2((h * m).sum(1) / m.sum(1))

    h = torch.autograd.functional.hessian(lambda z: kl_sum(p, _forward_with(z)), torch.zeros(e.numel(), dtype=e.dtype))
    keep = am.to(h.dtype).unsqueeze(-1).expand_as(e).flatten().bool()
    if norm == "global":
        assert r.norm().item() == pytest.approx(1.5, rel=1e-9)
        v, _ = top_eigvec(h[keep][:, keep])
        assert abs_cos(r.flatten()[keep], v) > 0.999
    elif norm == "sample":
        for b in range(2):
            assert r[b].norm().item() == pytest.approx(1.5, rel=1e-9)
            idx = torch.arange(e.numel()).reshape(e.shape)[b].flatten()
            idx = idx[keep[idx]]
            v, _ = top_eigvec(h[idx][:, idx])
            assert abs_cos(r.flatten()[idx], v) > 0.999
    else:
        hd = (h @ r.flatten()).reshape(e.shape)
        for b in range(2):
            for t in range(4):
                if am[b, t]:
                    assert r[b, t].norm().item() == pytest.approx(1.5, rel=1e-9)
                    assert abs_cos(hd[b, t], r[b, t]) > 0.999  # per-token fixed point of d <- N(H d)


def test_weight_target_converges_to_top_eigenvector():
    model = TinyText(vocab=12, dim=3, seed=0)
    ids = torch.tensor([[1, 2, 3], [3, 5, 7]])
    p = model(ids).detach()
    w0 = model.emb.weight.detach().clone()

    def loss_of(flat):
        w = w0 + flat.reshape(w0.shape)
        return kl_sum(p, model.fc2(torch.tanh(model.fc1(F.embedding(ids, w))).mean(1)))

    h = torch.autograd.functional.hessian(loss_of, torch.zeros(w0.numel(), dtype=w0.dtype))
    v, vals = top_eigvec(h)
    vat = fastvat.VAT(model, embedding="emb", target="weight", xi=1e-4, eps=1.0, iters=80,
                      generator=torch.Generator().manual_seed(4))
    r = vat.perturbation(ids)
    assert r.shape == w0.shape
    assert r.norm().item() == pytest.approx(1.0, rel=1e-9)
    assert abs_cos(r, v) > 0.999
    off_batch = torch.ones(12, dtype=torch.bool)
    off_batch[ids.unique()] = False
    assert torch.all(r[off_batch] == 0)
    assert torch.equal(model.emb.weight.detach(), w0), "weight mode must never write the weight"


# ------------------------------------------------------------------------------------------
# Weight mode == the article's dense in-place algorithm
# ------------------------------------------------------------------------------------------
def _dense_article_vat(model, ids, d0, xi, eps, iters):
    """The article's Keras loop, in PyTorch: perturb the whole matrix in place, then undo."""
    emb = model.emb.weight
    p = model(ids).detach()
    delta1, delta2 = torch.zeros_like(emb), d0.clone()
    with torch.no_grad():
        for _ in range(iters):
            delta2 = xi * delta2 / delta2.norm()
            emb.add_(delta2 - delta1)
            delta1 = delta2
            with torch.enable_grad():
                (delta2,) = torch.autograd.grad(kl_sum(p, model(ids)), emb)
        delta2 = eps * delta2 / delta2.norm()
        emb.add_(delta2 - delta1)
        loss = kl_sum(p, model(ids)) / ids.shape[0]
        emb.sub_(delta2)
    return delta2, loss


@pytest.mark.parametrize("iters", [0, 1, 2])
def test_weight_mode_matches_dense_article_algorithm(iters):
    model = TinyText(vocab=30, dim=4, seed=0)
    ids = torch.tensor([[1, 2, 3, 9], [3, 5, 7, 29]])
    rows = ids.unique()
    seed = 11
    # Rebuild the dense start the weight target draws: the active rows' Gaussian, and rows
    # outside the batch carrying exactly the chi-square mass it samples.
    g = torch.Generator().manual_seed(seed)
    g_rows = torch.randn((rows.numel(), 4), generator=g, dtype=torch.float64)
    rest_sq = chi2_sample((30 - rows.numel()) * 4, generator=g, dtype=torch.float64)
    d0 = torch.zeros(30, 4, dtype=torch.float64)
    d0[rows] = g_rows
    others = torch.ones(30, dtype=torch.bool)
    others[rows] = False
    filler = torch.randn(int(others.sum()), 4, dtype=torch.float64)
    d0[others] = filler * (rest_sq.sqrt() / filler.norm())
    w_before = model.emb.weight.detach().clone()
    r_dense, loss_dense = _dense_article_vat(model, ids, d0, xi=10.0, eps=1.0, iters=iters)

    vat = fastvat.VAT(model, embedding=model.emb, target="weight", xi=10.0, eps=1.0, iters=iters,
                      generator=torch.Generator().manual_seed(seed))
    r = vat.perturbation(ids)
    if iters == 0:
        # Off-batch rows of the dense noise never reach the loss; fastvat reports them as zero.
        torch.testing.assert_close(r[rows], r_dense[rows], rtol=1e-9, atol=1e-12)
        assert torch.all(r[others] == 0)
    else:
        torch.testing.assert_close(r, r_dense, rtol=1e-9, atol=1e-12)
    loss = fastvat.VAT(model, embedding=model.emb, target="weight", xi=10.0, eps=1.0, iters=iters,
                       generator=torch.Generator().manual_seed(seed))(ids)
    torch.testing.assert_close(loss, loss_dense, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(model.emb.weight.detach(), w_before)


@pytest.mark.parametrize("vocab,dim", [(60, 4), (3000, 8)])  # exact and Wilson–Hilferty chi-square paths
def test_chi_square_start_matches_dense_start_in_distribution(vocab, dim):
    scipy_stats = pytest.importorskip("scipy.stats")
    model = TinyText(vocab=vocab, dim=dim, seed=0)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    rows = ids.unique()
    vat = fastvat.VAT(model, embedding=model.emb, target="weight", eps=1.0, iters=0,
                      generator=torch.Generator().manual_seed(5))
    draws = 1500
    fast = torch.stack([vat.perturbation(ids)[rows].norm() for _ in range(draws)])
    g = torch.Generator().manual_seed(6)
    dense = torch.stack([
        (lambda d: (d / d.norm())[rows].norm())(torch.randn(vocab, dim, generator=g, dtype=torch.float64))
        for _ in range(draws)
    ])
    stat = scipy_stats.ks_2samp(fast.numpy(), dense.numpy())
    assert stat.pvalue > 1e-3, stat
    # And the direction on the active rows is isotropic: mean of each coordinate ~ 0.
    expected = math.sqrt(rows.numel() * dim / (vocab * dim))
    assert float(fast.mean()) == pytest.approx(expected, rel=0.05)


# ------------------------------------------------------------------------------------------
# Behaviour
# ------------------------------------------------------------------------------------------
def test_iters_zero_is_gaussian_noise_of_norm_eps():
    model = mlp((5, 16, 4), dtype=torch.float64)
    x = torch.randn(6, 5, dtype=torch.float64)
    vat = fastvat.VAT(model, eps=0.3, iters=0, generator=torch.Generator().manual_seed(0))
    r1, r2 = vat.perturbation(x), vat.perturbation(x)
    torch.testing.assert_close(r1.norm(dim=1), torch.full((6,), 0.3, dtype=torch.float64))
    assert not torch.allclose(r1, r2)


def test_logits_argument_matches_internal_clean_forward():
    model = mlp((5, 16, 4), dtype=torch.float64)
    x = torch.randn(6, 5, dtype=torch.float64)
    a = fastvat.VAT(model, generator=torch.Generator().manual_seed(7))(x)
    b = fastvat.VAT(model, generator=torch.Generator().manual_seed(7))(x, logits=model(x))
    torch.testing.assert_close(a, b)


def test_vatloss_dropin_matches_vat_sample_norm():
    model = mlp((5, 16, 4), dtype=torch.float64)
    x = torch.randn(6, 5, dtype=torch.float64)
    torch.manual_seed(3)
    a = fastvat.VATLoss(xi=10.0, eps=1.0, ip=1)(model, x)
    torch.manual_seed(3)
    b = fastvat.VAT(model, xi=10.0, eps=1.0, iters=1, norm="sample")(x)
    torch.testing.assert_close(a, b)
    assert a.item() > 0


def test_vatloss_is_a_module_without_state():
    """nn.Module like the snippets' class: forward, .to(), containers, an empty state_dict; the model
    it is called with is not a submodule (it is neither saved nor moved with the loss)."""
    model = mlp((5, 16, 4))
    x = torch.randn(6, 5)
    vat_loss = fastvat.VATLoss(xi=10.0, eps=1.0, ip=1)
    assert isinstance(vat_loss, nn.Module)
    torch.manual_seed(3)
    a = vat_loss(model, x)
    torch.manual_seed(3)
    torch.testing.assert_close(vat_loss.forward(model, x), a)
    assert dict(vat_loss.state_dict()) == {} and list(vat_loss.children()) == []
    assert list(vat_loss.parameters()) == [] and list(vat_loss.buffers()) == []
    heads = nn.ModuleDict({"vat": vat_loss})
    assert heads["vat"] is vat_loss and dict(heads.state_dict()) == {}
    assert vat_loss.to(torch.float64) is vat_loss
    assert all(p.dtype == torch.float32 for p in model.parameters())
    torch.manual_seed(3)
    torch.testing.assert_close(vat_loss(model, x), a)


def test_vatloss_does_not_keep_the_model_alive():
    vat_loss = fastvat.VATLoss()
    model = mlp((5, 16, 4), dtype=torch.float64)
    vat_loss(model, torch.randn(6, 5, dtype=torch.float64))
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


class _NoForwardAD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


def test_vatloss_remembers_a_model_without_forward_ad_while_it_lives():
    """In bf16 the exact power step needs forward-mode AD: a model without it warns once, and is
    then remembered (finite differences, no second try) without being kept alive."""
    class NoJvp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            return self.fc(_NoForwardAD.apply(x))

    vat_loss, model, x = fastvat.VATLoss(xi=1.0), NoJvp(), torch.randn(4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.warns(RuntimeWarning, match="forward-mode AD"):
            vat_loss(model, x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch.manual_seed(3)
            again = vat_loss(model, x)
        torch.manual_seed(3)
        fd = fastvat.VAT(model, xi=1.0, iters=1, norm="sample", hvp="finite_difference")(x)
        assert torch.isfinite(again) and torch.equal(again, fd)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


class Segmenter(nn.Module):
    """[N, 2, H, W] images -> [N, 4, H, W] per-pixel class logits (class dim 1)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 1)
        self.double()

    def forward(self, x):
        return self.conv2(torch.tanh(self.conv1(x)))


def test_class_dim_1_is_the_kl_over_the_class_channel():
    """VAT of segmentation logits with class_dim=1: KL(softmax over dim 1) summed over pixels, / N."""
    torch.manual_seed(0)
    model = Segmenter()
    x = torch.randn(3, 2, 5, 6, dtype=torch.float64)
    loss = fastvat.VAT(model, class_dim=1, generator=torch.Generator().manual_seed(4))(x)
    r = fastvat.VAT(model, class_dim=1, generator=torch.Generator().manual_seed(4)).perturbation(x)
    lp, lq = F.log_softmax(model(x), 1), F.log_softmax(model(x + r), 1)
    expected = (lp.exp() * (lp - lq)).sum() / x.shape[0]
    torch.testing.assert_close(loss, expected)
    # the same class channel named from the end, and the same logits with their classes moved last
    torch.testing.assert_close(fastvat.VAT(model, class_dim=-3, generator=torch.Generator().manual_seed(4))(x), loss)
    last = nn.Sequential(model, nn.Flatten(2))  # [N, 4, H*W]: three dims, class_dim must still be said
    torch.testing.assert_close(fastvat.VAT(last, class_dim=1, generator=torch.Generator().manual_seed(4))(x), loss)


class TokenTagger(nn.Module):
    """ids -> per-token logits, returned [B, C, T] (classes_first) or [B, T, C]."""

    def __init__(self, classes_first):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 4)
        self.fc = nn.Linear(4, 3)
        self.classes_first = classes_first
        self.double()

    def forward(self, input_ids, attention_mask=None):
        z = self.fc(torch.tanh(self.emb(input_ids)))
        return z.transpose(1, 2) if self.classes_first else z


@pytest.mark.parametrize("cls", [fastvat.VAT, fastvat.RandomNoise, fastvat.GradientPenalty])
def test_class_dim_lines_up_with_the_attention_mask(cls):
    """[B, C, T] logits with class_dim=1 give what the same model returning [B, T, C] gives: the
    attention mask still masks the padded tokens' rows."""
    ids = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(1))
    am = torch.ones(3, 5, dtype=torch.long)
    am[0, 3:] = 0
    am[2, 1:] = 0
    losses = []
    for classes_first, kw in [(True, {"class_dim": 1}), (False, {})]:
        reg = cls(TokenTagger(classes_first), embedding="emb", generator=torch.Generator().manual_seed(2), **kw)
        losses.append(reg(ids, attention_mask=am))
    torch.testing.assert_close(losses[0], losses[1])
    assert losses[0] > 0


def test_class_dim_reaches_the_exact_power_step():
    """hvp="exact" (the low-precision power step) takes the softmax over class_dim too."""
    torch.manual_seed(0)
    model = Segmenter()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    r = [fastvat.VAT(model, class_dim=1, hvp=h, xi=1e-4, generator=torch.Generator().manual_seed(5)).perturbation(x)
         for h in ("exact", "finite_difference")]
    assert abs_cos(r[0], r[1]) > 0.999


def test_loss_gradient_flows_to_parameters_only_through_final_pass():
    model = mlp((5, 16, 4), dtype=torch.float64)
    x = torch.randn(6, 5, dtype=torch.float64)
    vat = fastvat.VAT(model, eps=0.5, generator=torch.Generator().manual_seed(0))
    loss = vat(x)
    assert all(p.grad is None for p in model.parameters()), "power iteration must not write .grad"
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


class BNNet(nn.Module):
    def __init__(self, fail_on_call=None):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(6, 3)
        self.calls = 0
        self.fail_on_call = fail_on_call

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise RuntimeError("boom")
        return self.fc(self.drop(self.bn(self.emb(input_ids).mean(1))))


def _snapshot(model):
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "grads": {k: None if v.grad is None else v.grad.clone() for k, v in model.named_parameters()},
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "training": [m.training for m in model.modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), "forward" in m.__dict__) for m in model.modules()],
    }


def _assert_same(a, b):
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
        ga, gb = a["grads"][k], b["grads"][k]
        assert (ga is None and gb is None) or torch.equal(ga, gb), k
    for k in a["buffers"]:
        assert torch.equal(a["buffers"][k], b["buffers"][k]), k
    assert a["training"] == b["training"]
    assert a["hooks"] == b["hooks"]


def _regularizers(model):
    return [
        fastvat.VAT(model, embedding=model.emb),
        fastvat.VAT(model, embedding=model.emb, target="weight"),
        fastvat.RandomNoise(model, embedding=model.emb, k=2),
        fastvat.FGM(model, loss_fn=F.cross_entropy, embedding=model.emb),
        fastvat.PGD(model, loss_fn=F.cross_entropy, embedding=model.emb, target="weight", steps=2),
        fastvat.GradientPenalty(model, embedding=model.emb),
    ]


@pytest.mark.parametrize("index", range(6))
@pytest.mark.parametrize("fail_on_call", [None, 1, 2, 3])
def test_nothing_lost(index, fail_on_call):
    torch.manual_seed(0)
    model = BNNet()
    model.train()
    model.fc.eval()  # a mixed state must survive too
    ids = torch.randint(0, 20, (8, 5))
    y = torch.randint(0, 3, (8,))
    model(ids).sum().backward()  # existing .grad and BN statistics to preserve
    reg = _regularizers(model)[index]
    kwargs = {"y": y} if isinstance(reg, (fastvat.FGM, fastvat.PGD)) else {}
    before = _snapshot(model)
    if fail_on_call is not None:
        model.calls = 0
        reg(ids, **kwargs)  # count the passes this regularizer makes; fail in the last one at most
        fail_on_call = min(fail_on_call, model.calls)
        _assert_same(before, _snapshot(model))
    model.calls, model.fail_on_call = 0, fail_on_call
    if fail_on_call is None:
        loss = reg(ids, **kwargs)
        assert torch.isfinite(loss)
    else:
        with pytest.raises(RuntimeError, match="boom"):
            reg(ids, **kwargs)
    _assert_same(before, _snapshot(model))


@pytest.mark.parametrize("xi,min_cos", [(1e-1, 0.995), (1e-2, 0.995)])
def test_default_xi_gives_the_hessian_direction_in_float32(xi, min_cos):
    """Why the per-sample defaults use xi=0.1: one float32 finite-difference power step from a given
    start matches the exact (float64) H·d; the VAT paper's 1e-6 is below float32 resolution here."""
    model = mlp((20, 64, 5))
    x = torch.randn(8, 20)
    seed = 9
    d0 = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    r = fastvat.VAT(model, xi=xi, eps=1.0, iters=1, norm="sample",
                    generator=torch.Generator().manual_seed(seed)).perturbation(x)
    m64 = model.double()
    for i in range(x.shape[0]):
        xi_ = x[i : i + 1].double()
        p = m64(xi_).detach()
        h = torch.autograd.functional.hessian(lambda z: kl_sum(p, m64(xi_ + z.reshape(1, 20))), torch.zeros(20, dtype=torch.float64))
        assert abs_cos(r[i].double(), h @ d0[i].double()) > min_cos
    model.float()


class _EmbedThenLinear(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 33)
        self.out = nn.Linear(33, 5)
        self.to(dtype)

    def forward(self, ids):
        return self.out(self.emb(ids))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("norm", ["global", "sample", "token"])
@pytest.mark.parametrize("target", ["input", "output"])
def test_random_start_is_normalised_before_it_is_rounded_to_a_half_type(target, norm, dtype):
    """The float32 random start of a bf16/fp16 model is normalised in float32 and rounded once: every
    element within half a unit in the last place of the float64 truth (rounding the draw to 16 bits
    before its norm, then the result again, exceeds that)."""
    if target == "input":
        model = nn.Linear(33, 5).to(dtype)
        x = torch.randn(4, 6, 33).to(dtype)
        kw = {}
    else:
        model = _EmbedThenLinear(dtype)
        x = torch.randint(0, 20, (4, 6), generator=torch.Generator().manual_seed(1))
        kw = {"embedding": model.emb, "target": "output"}
    vat = fastvat.VAT(model, iters=0, eps=0.5, norm=norm, generator=torch.Generator().manual_seed(3), **kw)
    r = vat.perturbation(x)
    assert r.dtype == dtype and r.shape == (4, 6, 33)
    draw = torch.randn(4, 6, 33, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    truth = ref.l2_normalize(draw.double(), scale=0.5, norm=norm)
    fi = torch.finfo(dtype)
    bound = fi.eps / 2 * (1 + 1e-3) * truth.abs() + fi.tiny * fi.eps / 2
    excess = ((r.double() - truth).abs() - bound).max().item()
    assert excess <= 0, excess


class _Conv1dTagger(nn.Module):
    """[N, 2, L] -> [N, 3, L] logits: classes in dim 1, as a Conv1d returns them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.double()

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("class_dim,softmax_dim", [(1, 1), (None, -1)], ids=["class_dim=1", "default"])
def test_three_dim_logits_take_the_last_dim_unless_told(class_dim, softmax_dim):
    """The documented default: [N, C, L] logits are read as [B, T, C] (the softmax over L) unless
    class_dim=1 says where the classes are."""
    model = _Conv1dTagger()
    x = torch.randn(3, 2, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    loss = fastvat.VAT(model, class_dim=class_dim, generator=torch.Generator().manual_seed(4))(x)
    r = fastvat.VAT(model, class_dim=class_dim, generator=torch.Generator().manual_seed(4)).perturbation(x)
    lp, lq = F.log_softmax(model(x), softmax_dim), F.log_softmax(model(x + r), softmax_dim)
    torch.testing.assert_close(loss, (lp.exp() * (lp - lq)).sum() / x.shape[0])
