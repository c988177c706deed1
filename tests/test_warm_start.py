"""VAT(warm_start=True): successive calls continue one power iteration through the caller's backward."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastvat

from hessian import abs_cos, kl_sum, top_eigvec
from models import TinyText, mlp


def _warm_calls(vat, n, *args, **kwargs):
    """n calls whose loss is backpropagated (the model frozen: only r_adv receives a gradient)."""
    for _ in range(n):
        vat(*args, **kwargs).backward()


def _frozen(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_input_target_warm_calls_reach_the_top_eigenvector():
    model = _frozen(mlp((5, 16, 4), dtype=torch.float64))
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    p = model(x).detach()
    h = torch.autograd.functional.hessian(lambda r: kl_sum(p, model(x + r.reshape(x.shape))),
                                          torch.zeros(x.numel(), dtype=x.dtype))
    v, vals = top_eigvec(h)
    assert vals[-1] > 1.05 * vals[-2]
    vat = fastvat.VAT(model, eps=1e-4, iters=0, norm="global", warm_start=True,
                      generator=torch.Generator().manual_seed(1))
    index = torch.tensor([4, 0, 2])
    first = vat.perturbation(x, index=index)
    assert abs_cos(first, v) < 0.99  # the first call starts from a random draw
    _warm_calls(vat, 300, x, index=index)
    r = vat.perturbation(x, index=index)
    assert r.norm().item() == pytest.approx(1e-4, rel=1e-9)
    assert abs_cos(r, v) > 0.999


def test_input_target_sample_norm_warm_calls_converge_per_example():
    model = _frozen(mlp((5, 16, 4), dtype=torch.float64))
    x = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    vat = fastvat.VAT(model, eps=1e-4, iters=0, norm="sample", warm_start=True,
                      generator=torch.Generator().manual_seed(2))
    index = torch.arange(4)
    _warm_calls(vat, 150, x, index=index)
    r = vat.perturbation(x, index=index)
    for i in range(4):
        xi_, pi = x[i : i + 1], model(x[i : i + 1]).detach()
        h = torch.autograd.functional.hessian(lambda z: kl_sum(pi, model(xi_ + z.reshape(1, 5))),
                                              torch.zeros(5, dtype=x.dtype))
        v, _ = top_eigvec(h)
        assert abs_cos(r[i], v) > 0.999


@pytest.mark.parametrize("norm", ["global", "sample"])
def test_output_target_warm_calls_reach_the_top_eigenvector(norm):
    model = _frozen(TinyText(seed=0))
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]])
    am = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    vat = fastvat.VAT(model, embedding=model.emb, eps=1e-4, iters=0, norm=norm, warm_start=True,
                      generator=torch.Generator().manual_seed(3))
    index = torch.tensor([7, 2])
    _warm_calls(vat, 200, ids, attention_mask=am, index=index)
    r = vat.perturbation(ids, attention_mask=am, index=index)
    assert torch.all(r[0, 3] == 0)
    e = model.emb(ids).detach()
    p = model(ids, attention_mask=am).detach()

    def forward_with(flat):
        hdn = torch.tanh(model.fc1(e + flat.reshape(e.shape)))
        m = am.to(hdn.dtype).unsqueeze(-1)
        return model.fc2((hdn * m).sum(1) / m.sum(1))

    h = torch.autograd.functional.hessian(lambda z: kl_sum(p, forward_with(z)), torch.zeros(e.numel(), dtype=e.dtype))
    keep = am.to(h.dtype).unsqueeze(-1).expand_as(e).flatten().bool()
    if norm == "global":
        v, _ = top_eigvec(h[keep][:, keep])
        assert abs_cos(r.flatten()[keep], v) > 0.999
    else:
        for b in range(2):
            idx = torch.arange(e.numel()).reshape(e.shape)[b].flatten()
            idx = idx[keep[idx]]
            v, _ = top_eigvec(h[idx][:, idx])
            assert abs_cos(r.flatten()[idx], v) > 0.999


def test_weight_target_warm_calls_reach_the_top_eigenvector():
    model = _frozen(TinyText(vocab=12, dim=3, seed=0))
    ids = torch.tensor([[1, 2, 3], [3, 5, 7]])
    p = model(ids).detach()
    w0 = model.emb.weight.detach().clone()

    def loss_of(flat):
        w = w0 + flat.reshape(w0.shape)
        return kl_sum(p, model.fc2(torch.tanh(model.fc1(F.embedding(ids, w))).mean(1)))

    h = torch.autograd.functional.hessian(loss_of, torch.zeros(w0.numel(), dtype=w0.dtype))
    v, _ = top_eigvec(h)
    vat = fastvat.VAT(model, embedding="emb", target="weight", eps=1e-4, iters=0, warm_start=True,
                      generator=torch.Generator().manual_seed(4))
    _warm_calls(vat, 200, ids)
    r = vat.perturbation(ids)
    assert r.norm().item() == pytest.approx(1e-4, rel=1e-9)
    assert abs_cos(r, v) > 0.999
    assert torch.equal(model.emb.weight.detach(), w0)


def test_weight_target_store_is_row_sparse_and_unseen_rows_start_random():
    model = TinyText(vocab=30, dim=3, seed=0)
    vat = fastvat.VAT(model, embedding="emb", target="weight", iters=0, warm_start=True,
                      generator=torch.Generator().manual_seed(5))
    ids = torch.tensor([[1, 2, 3], [3, 5, 7]])
    vat(ids).backward()
    store = vat._store
    assert store.values.shape == (30, 3)
    seen = torch.zeros(30, dtype=torch.bool)
    seen[ids.unique()] = True
    assert torch.equal(store.seen, seen)
    assert torch.all(store.values[~seen] == 0)
    # each batch's rows are stored at an RMS of 1 (the scale of the N(0, 1) draws for unseen rows)
    assert store.values[seen].pow(2).mean().item() == pytest.approx(1.0, rel=1e-6)
    assert vat.warm_start_memory() == 30 * 3 * 8 + 30


def test_warm_start_index_errors_name_the_argument():
    model = mlp((5, 16, 4), dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="index="):
        fastvat.VAT(model, warm_start=True)(x)
    with pytest.raises(ValueError, match="index"):
        fastvat.VAT(model)(x, index=torch.arange(3))
    with pytest.raises(ValueError, match="index"):
        fastvat.VAT(model, warm_start=True)(x, index=torch.arange(4))
    with pytest.raises(ValueError, match="index"):
        fastvat.VAT(model, warm_start=True)(x, index=torch.arange(3).reshape(3, 1))
    with pytest.raises(TypeError, match="index"):
        fastvat.VAT(model, warm_start=True)(x, index=torch.zeros(3))
    with pytest.raises(TypeError, match="warm_start"):
        fastvat.VAT(model, warm_start=1)
    text = TinyText()
    with pytest.raises(ValueError, match="weight target"):
        fastvat.VAT(text, embedding="emb", target="weight", warm_start=True)(torch.tensor([[1, 2]]),
                                                                            index=torch.tensor([0]))


def test_nonfinite_gradient_does_not_poison_the_store():
    model = mlp((5, 16, 4), dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64)
    vat = fastvat.VAT(model, iters=0, warm_start=True, generator=torch.Generator().manual_seed(0))
    index = torch.tensor([0, 1, 2])
    vat(x, index=index).backward()
    before = vat._store.values.clone()
    (vat(x, index=index) * float("inf")).backward()  # what an AMP step with an overflowing loss scale hands back
    assert torch.equal(vat._store.values, before)
    assert torch.isfinite(vat._store.values).all()


def test_a_scaled_loss_stores_the_same_direction():
    """A GradScaler's (or a loss weight's) factor scales the gradient at r_adv, not its direction."""
    x = torch.randn(3, 5, dtype=torch.float64)
    index = torch.tensor([0, 1, 2])
    stores = []
    for factor in (1.0, 65536.0):
        vat = fastvat.VAT(mlp((5, 16, 4), dtype=torch.float64), iters=0, warm_start=True, generator=torch.Generator().manual_seed(0))
        (vat(x, index=index) * factor).backward()
        stores.append(vat._store.values)
    torch.testing.assert_close(stores[0], stores[1], rtol=1e-12, atol=0)


def test_bf16_store_halves_memory_and_still_warm_starts():
    model = _frozen(mlp((5, 16, 4)))
    x = torch.randn(3, 5)
    vat = fastvat.VAT(model, eps=1e-2, iters=0, norm="global", warm_start=True, warm_start_dtype=torch.bfloat16,
                      generator=torch.Generator().manual_seed(0))
    index = torch.tensor([2, 1, 0])
    _warm_calls(vat, 3, x, index=index)
    assert vat._store.values.dtype == torch.bfloat16
    assert vat.warm_start_memory() == 3 * 5 * 2 + 3


def test_sequence_length_may_change_between_calls():
    model = TinyText(seed=0)
    vat = fastvat.VAT(model, embedding=model.emb, iters=0, warm_start=True, generator=torch.Generator().manual_seed(0))
    vat(torch.tensor([[1, 2, 3]]), index=torch.tensor([0])).backward()
    vat(torch.tensor([[1, 2, 3, 4, 5]]), index=torch.tensor([0])).backward()  # longer: positions 3, 4 start random
    assert vat._store.values.shape[1] == 5 and vat._store.seen[0].all()
    vat(torch.tensor([[1, 2]]), index=torch.tensor([0])).backward()  # shorter: a prefix of the stored entry
    assert vat._store.values.shape[1] == 5


def test_entries_of_another_shape_are_refused():
    model = nn.Sequential(nn.Flatten(1), nn.Linear(6, 2)).double()
    vat = fastvat.VAT(model, iters=0, warm_start=True)
    vat(torch.randn(2, 6, dtype=torch.float64), index=torch.tensor([0, 1])).backward()
    with pytest.raises(ValueError, match="shape"):
        vat(torch.randn(2, 2, 3, dtype=torch.float64), index=torch.tensor([0, 1]))


def _train(model, vat, opt, batches, gen):
    losses = []
    for ids, y, idx in batches:
        logits = model(ids)
        loss = F.cross_entropy(logits, y) + vat(ids, logits=logits, index=idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.mark.parametrize("target", ["output", "weight"])
def test_save_and_resume_continue_bit_identically(target, tmp_path):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 20, (4, 6), generator=g), torch.randint(0, 3, (4,), generator=g),
                torch.randint(0, 10, (4,), generator=g)) for _ in range(8)]
    if target == "weight":
        batches = [(ids, y, None) for ids, y, _ in batches]

    def build():
        model = TinyText(seed=0)
        vat = fastvat.VAT(model, embedding="emb", target=target, eps=0.5, iters=1, warm_start=True,
                          generator=torch.Generator().manual_seed(1))
        return model, vat, torch.optim.Adam(model.parameters(), lr=1e-2)

    model, vat, opt = build()
    _train(model, vat, opt, batches[:4], g)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "vat": vat.state_dict()}, tmp_path / "ckpt.pt")
    straight = _train(model, vat, opt, batches[4:], g)

    model2, vat2, opt2 = build()
    state = torch.load(tmp_path / "ckpt.pt")
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    vat2.load_state_dict(state["vat"])
    resumed = _train(model2, vat2, opt2, batches[4:], g)
    assert torch.equal(straight, resumed)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(vat._store.values, vat2._store.values)


def test_load_state_dict_rejects_a_mismatched_state():
    model = mlp((5, 16, 4), dtype=torch.float64)
    cold = fastvat.VAT(model)
    warm = fastvat.VAT(model, warm_start=True)
    with pytest.raises(ValueError, match="warm_start"):
        warm.load_state_dict(cold.state_dict())
    with pytest.raises(ValueError, match="state"):
        warm.load_state_dict({"values": None})


def test_warm_call_leaves_model_state_untouched():
    from _state import assert_unchanged, snapshot
    model = TinyText(seed=0)
    vat = fastvat.VAT(model, embedding="emb", target="weight", warm_start=True, generator=torch.Generator())
    ids = torch.tensor([[1, 2, 3]])
    vat(ids).backward()
    model.zero_grad(set_to_none=True)
    before = snapshot(model)
    with torch.no_grad():
        vat(ids)
    assert_unchanged(before, snapshot(model))
