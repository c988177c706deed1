"""VAT and RandomNoise on a causal LM with ``head=``: the head's logits are never built, and the loss and
every gradient equal the unfused path's."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastvat

transformers = pytest.importorskip("transformers")


def tiny_llama(dtype=torch.float64, vocab=500):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def batch(vocab=500):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (3, 12), generator=g)
    am = torch.ones(3, 12, dtype=torch.long)
    am[1, 9:] = 0
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt
    labels[am == 0] = -100
    return ids, am, labels


def loss_and_grads(model, reg, *args, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = reg(*args, **kwargs)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def assert_same(a, b, rtol):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, rtol=rtol, atol=0)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * y.abs().max().item())


@pytest.mark.parametrize("target", ["output", "weight"])
def test_vat_with_head_equals_the_unfused_path(target):
    model = tiny_llama()
    ids, am, _ = batch()
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    runs = [loss_and_grads(model, fastvat.VAT(model, embedding=emb, target=target, head=h, eps=1.0, xi=1e-3,
                                              generator=torch.Generator().manual_seed(1)), ids, attention_mask=am)
            for h in (head, None)]
    assert runs[0][0] > 0
    assert_same(runs[0], runs[1], rtol=1e-10)


def test_vat_with_head_in_bf16_matches_the_unfused_path_within_bf16():
    model = tiny_llama(torch.bfloat16)
    ids, am, _ = batch()
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    runs = [loss_and_grads(model, fastvat.VAT(model, embedding=emb, head=h, eps=1.0, xi=1.0, hvp="finite_difference",
                                              generator=torch.Generator().manual_seed(1)), ids, attention_mask=am)
            for h in (head, None)]
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0.05, atol=0)


def test_labels_mask_the_prompt_and_padding_positions():
    """The logits at t predict token t + 1: position t counts where labels[t + 1] != -100 (and it is not padding)."""
    model = tiny_llama()
    ids, am, labels = batch()
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    vat = fastvat.VAT(model, embedding=emb, head=head, eps=1.0, xi=1e-3, generator=torch.Generator().manual_seed(1))
    r = vat.perturbation(ids, attention_mask=am, labels=labels)
    vat = fastvat.VAT(model, embedding=emb, head=head, eps=1.0, xi=1e-3, generator=torch.Generator().manual_seed(1))
    loss = vat(ids, attention_mask=am, labels=labels)
    with torch.no_grad():
        p = model(ids, attention_mask=am).logits
        handle = emb.register_forward_hook(lambda module, inputs, output: output + r)
        try:
            q = model(ids, attention_mask=am).logits
        finally:
            handle.remove()
    keep = torch.zeros(3, 12, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    keep &= am.bool()
    lp, lq = F.log_softmax(p, -1), F.log_softmax(q, -1)
    rows = (lp.exp() * (lp - lq)).sum(-1)
    expected = (rows * keep).sum() / 3
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-9, atol=0)
    assert torch.all(r[1, 9:] == 0), "padding is not perturbed"


class LargestStorage(TorchDispatchMode):
    """The largest storage (bytes) of any tensor an op returns: views such as the head's stand-in
    (a zero broadcast to the logits' shape) take no memory and do not count."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize("reg", ["vat", "noise_symmetric"])
def test_head_path_never_builds_the_logits(reg, monkeypatch):
    """With 16-token chunks, no tensor of the call comes near the [B, T, V] logits (the head's own
    [V, H] parameters and their gradients are 1/8 of them here)."""
    import fastvat.ops.linear_kl as linear_kl

    vocab, b, t = 2048, 8, 32
    monkeypatch.setattr(linear_kl, "CHUNK_ELEMENTS", 16 * vocab)
    model = tiny_llama(torch.float32, vocab=vocab)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    am = torch.ones(b, t, dtype=torch.long)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if reg == "vat":
        r = fastvat.VAT(model, embedding=emb, head=head, generator=torch.Generator().manual_seed(0))
    else:
        r = fastvat.RandomNoise(model, embedding=emb, head=head, sigma=1e-2, symmetric=True,
                                generator=torch.Generator().manual_seed(0))
    logits_bytes = ids.numel() * vocab * 4
    with LargestStorage() as probe:
        r(ids, attention_mask=am).backward()
    assert 0 < probe.largest <= logits_bytes / 8
    with LargestStorage() as unfused:
        model(ids, attention_mask=am)
    assert unfused.largest >= logits_bytes  # the probe does see logits where they are built


@pytest.mark.parametrize("target", ["output", "weight"])
def test_symmetric_noise_with_head_equals_the_unfused_path(target):
    model = tiny_llama()
    ids, am, _ = batch()
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    runs = [loss_and_grads(model, fastvat.RandomNoise(model, embedding=emb, target=target, head=h, sigma=1e-2,
                                                      symmetric=True, generator=torch.Generator().manual_seed(1)),
                           ids, attention_mask=am)
            for h in (head, None)]
    assert_same(runs[0], runs[1], rtol=1e-10)


def test_symmetric_noise_is_both_kl_directions():
    model = tiny_llama()
    ids, am, _ = batch()
    emb = model.get_input_embeddings()
    loss = fastvat.RandomNoise(model, embedding=emb, sigma=1e-2, symmetric=True,
                               generator=torch.Generator().manual_seed(1))(ids, attention_mask=am)
    r = fastvat.RandomNoise(model, embedding=emb, sigma=1e-2, generator=torch.Generator().manual_seed(1))
    forward = r(ids, attention_mask=am)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        p = model(ids, attention_mask=am).logits
        noise = torch.randn(ids.shape + (emb.embedding_dim,), generator=g, dtype=torch.float64) * 1e-2
        handle = emb.register_forward_hook(lambda module, inputs, output: output + noise)
        try:
            q = model(ids, attention_mask=am).logits
        finally:
            handle.remove()
    lp, lq = F.log_softmax(p, -1), F.log_softmax(q, -1)
    m = am.to(lp.dtype)
    kl_pq = ((lp.exp() * (lp - lq)).sum(-1) * m).sum() / 3
    kl_qp = ((lq.exp() * (lq - lp)).sum(-1) * m).sum() / 3
    torch.testing.assert_close(forward.detach(), kl_pq, rtol=1e-9, atol=0)
    torch.testing.assert_close(loss.detach(), kl_pq + kl_qp, rtol=1e-9, atol=0)


def test_head_errors_name_the_argument():
    model = tiny_llama()
    ids, am, _ = batch()
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    with pytest.raises(TypeError, match="head"):
        fastvat.VAT(model, embedding=emb, head=emb)
    with pytest.raises(ValueError, match="head"):
        fastvat.VAT(model, embedding=emb, head=torch.nn.Linear(32, 500))
    with pytest.raises(ValueError, match="hvp"):
        fastvat.VAT(model, embedding=emb, head=head, hvp="exact")
    with pytest.raises(ValueError, match="class_dim"):
        fastvat.VAT(model, embedding=emb, head=head, class_dim=1)
    with pytest.raises(ValueError, match="logits="):
        fastvat.VAT(model, embedding=emb, head=head)(ids, attention_mask=am, logits=torch.zeros(3, 12, 500))
    with pytest.raises(ValueError, match="loss_fn"):
        fastvat.RandomNoise(model, embedding=emb, head=head, loss_fn=F.cross_entropy)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="soft-caps"):
        fastvat.VAT(model, embedding=emb, head=head)
    assert "forward" not in head.__dict__  # nothing left patched after the errors


def test_vat_trainer_uses_the_head_path():
    from fastvat.integrations.huggingface import VATTrainer

    model = tiny_llama(torch.float32)
    ids, am, labels = batch()
    args = transformers.TrainingArguments(output_dir="/tmp/fastvat_lm_head_trainer", report_to=[], use_cpu=True,
                                          per_device_train_batch_size=3)
    head = model.get_output_embeddings()
    trainer = VATTrainer(model=model, args=args, vat={"head": head, "generator": torch.Generator().manual_seed(2)})
    inputs = {"input_ids": ids, "attention_mask": am, "labels": labels}
    got = trainer.compute_vat_loss(model, inputs, logits=torch.zeros(3, 12, 500))  # logits are ignored with head=
    vat = fastvat.VAT(model, embedding=model.get_input_embeddings(), head=head,
                      generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(got.detach(), vat(**inputs).detach(), rtol=1e-6, atol=0)
    assert trainer.get_vat(model).head is head
