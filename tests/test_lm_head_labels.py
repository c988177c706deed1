"""A call's ``labels`` mark the positions a language model trains, the same on the fused (``head=``) and the
unfused path: a causal LM's labels shifted as in its loss, an encoder-decoder's unshifted; a classifier's
labels are class ids and change nothing."""
import pytest
import torch
import torch.nn.functional as F

import fastvat

transformers = pytest.importorskip("transformers")

VOCAB = 64


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).double().eval()


def batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (3, 10), generator=g)
    am = torch.ones(3, 10, dtype=torch.long)
    am[1, 7:] = 0
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt
    labels[am == 0] = -100
    return ids, am, labels


def make(kind, model, head, **kw):
    emb, g = model.get_input_embeddings(), torch.Generator().manual_seed(1)
    if kind == "vat":
        return fastvat.VAT(model, embedding=emb, head=head, eps=1.0, xi=1e-3, generator=g, **kw)
    return fastvat.RandomNoise(model, embedding=emb, head=head, sigma=1e-2, symmetric=True, generator=g, **kw)


def loss_and_grads(model, reg, **inputs):
    model.zero_grad(set_to_none=True)
    loss = reg(**inputs)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("kind", ["vat", "noise_symmetric"])
def test_labels_mask_the_same_positions_with_and_without_head(kind):
    model = tiny_llama()
    ids, am, labels = batch()
    inputs = dict(input_ids=ids, attention_mask=am, labels=labels)
    (lf, gf), (lu, gu) = [loss_and_grads(model, make(kind, model, h), **inputs)
                          for h in (model.get_output_embeddings(), None)]
    torch.testing.assert_close(lf, lu, rtol=1e-9, atol=0)
    for x, y in zip(gf, gu):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9 * y.abs().max().item())
    without = make(kind, model, None)(input_ids=ids, attention_mask=am).detach()
    assert abs(lu / without - 1) > 0.05  # the prompt is a large share of the positions here


def test_unfused_labels_are_the_positions_the_causal_lm_loss_trains():
    """The logits at t predict token t + 1: position t counts where labels[t + 1] != -100."""
    model = tiny_llama()
    ids, am, labels = batch()
    emb = model.get_input_embeddings()
    g = torch.Generator().manual_seed(1)
    loss = fastvat.RandomNoise(model, embedding=emb, sigma=1e-2, generator=g)(ids, attention_mask=am, labels=labels)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        p = model(ids, attention_mask=am).logits
        noise = torch.randn(ids.shape + (emb.embedding_dim,), generator=g, dtype=torch.float64) * 1e-2
        handle = emb.register_forward_hook(lambda module, inputs, output: output + noise)
        try:
            q = model(ids, attention_mask=am).logits
        finally:
            handle.remove()
    keep = torch.zeros(3, 10, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    keep &= am.bool()
    lp, lq = F.log_softmax(p, -1), F.log_softmax(q, -1)
    expected = ((lp.exp() * (lp - lq)).sum(-1) * keep).sum() / 3
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-9, atol=0)


@pytest.mark.parametrize("kind", ["vat", "noise_symmetric"])
@pytest.mark.parametrize("fused", [True, False], ids=["head", "no_head"])
@pytest.mark.parametrize("shape", ["pre_shifted", "per_sample"])
def test_labels_of_the_wrong_shape_are_refused(kind, fused, shape):
    model = tiny_llama()
    ids, am, labels = batch()
    bad = labels[:, 1:] if shape == "pre_shifted" else labels[:, -1]
    reg = make(kind, model, model.get_output_embeddings() if fused else None)
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"labels must be a tensor of shape \(3, 10\).*got shape"):
        reg(input_ids=ids, attention_mask=am, labels=bad)
    assert torch.equal(torch.get_rng_state(), state)
    assert "forward" not in model.get_output_embeddings().__dict__


def test_labels_mask_the_exact_power_step_too():
    """hvp='exact' (the unfused path's step in half precision) finds the direction of the masked KL,
    as the finite-difference step with a small xi does."""
    model = tiny_llama()
    ids, am, labels = batch()
    emb = model.get_input_embeddings()
    r = {hvp: fastvat.VAT(model, embedding=emb, eps=1.0, xi=1e-4, hvp=hvp, iters=2,
                          generator=torch.Generator().manual_seed(1)).perturbation(ids, attention_mask=am,
                                                                                   labels=labels)
         for hvp in ("exact", "finite_difference")}
    cos = F.cosine_similarity(r["exact"].flatten(), r["finite_difference"].flatten(), dim=0)
    assert cos > 1 - 1e-5  # 1 - cos is about 0.36 where the exact step ignores the labels


def test_a_sequence_classifiers_labels_change_nothing():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
    for cls in (transformers.LlamaForSequenceClassification, transformers.LlamaForTokenClassification):
        model = cls(cfg).double().eval()
        ids, am, labels = batch()
        labels = labels.clamp_min(-100) % 3 if cls is transformers.LlamaForSequenceClassification else labels % 3
        if cls is transformers.LlamaForSequenceClassification:
            labels = labels[:, 0]  # class ids [B]
        else:
            labels[:, :4] = -100  # [B, T] class ids with ignored positions: not a causal LM's positions
        losses = [fastvat.VAT(model, embedding=model.get_input_embeddings(), eps=1.0,
                              generator=torch.Generator().manual_seed(1))(input_ids=ids, attention_mask=am, **kw)
                  for kw in ({"labels": labels}, {})]
        torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)


def tiny_bart():
    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                  decoder_ffn_dim=32, max_position_embeddings=32)
    model = transformers.BartForConditionalGeneration(cfg).double().eval()
    with torch.no_grad():
        model.final_logits_bias.normal_()  # the fused path must add it to the head's output too
    return model


@pytest.mark.parametrize("kind", ["vat", "noise_symmetric"])
def test_an_encoder_decoders_labels_are_not_shifted(kind):
    """Its loss scores the decoder's logits at t against labels[t]: position t counts where labels[t] != -100."""
    model = tiny_bart()
    g = torch.Generator().manual_seed(3)
    ids, dec = torch.randint(3, VOCAB, (2, 7), generator=g), torch.randint(3, VOCAB, (2, 6), generator=g)
    labels = dec.clone()
    labels[:, :2] = -100
    labels[1, 4:] = -100
    inputs = dict(input_ids=ids, decoder_input_ids=dec, labels=labels)
    emb = model.model.encoder.embed_tokens
    reg = {h is None: (fastvat.VAT(model, embedding=emb, head=h, eps=1.0, xi=1e-3, generator=torch.Generator().manual_seed(1))
                       if kind == "vat" else
                       fastvat.RandomNoise(model, embedding=emb, head=h, sigma=1e-2, symmetric=True,
                                           generator=torch.Generator().manual_seed(1)))
           for h in (model.get_output_embeddings(), None)}
    fused, unfused = reg[False](**inputs).detach(), reg[True](**inputs).detach()
    torch.testing.assert_close(fused, unfused, rtol=1e-9, atol=0)
    # against the KL at the unshifted positions, with the model's own logits
    r = fastvat.RandomNoise(model, embedding=emb, sigma=0.5, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        p = model(input_ids=ids, decoder_input_ids=dec).logits
        noise = torch.randn(ids.shape + (16,), generator=g, dtype=torch.float64) * 0.5
        handle = emb.register_forward_hook(lambda module, inputs, output: output + noise)
        try:
            q = model(input_ids=ids, decoder_input_ids=dec).logits
        finally:
            handle.remove()
    lp, lq = F.log_softmax(p, -1), F.log_softmax(q, -1)
    expected = ((lp.exp() * (lp - lq)).sum(-1) * (labels != -100)).sum() / 2
    # (a small KL, summed from terms larger than itself: rounding is relatively large)
    torch.testing.assert_close(r(**inputs).detach(), expected, rtol=1e-6, atol=0)


def test_a_final_logits_bias_wider_than_the_head_is_refused():
    model = tiny_bart().float()
    model.final_logits_bias = model.final_logits_bias.double()
    with pytest.raises(TypeError, match="final_logits_bias.*float64.*float32"):
        fastvat.VAT(model, embedding=model.model.encoder.embed_tokens, head=model.get_output_embeddings())
