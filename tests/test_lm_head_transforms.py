"""``head=`` on causal LMs whose forward changes the head's output: a scale (Granite's logits_scaling,
Cohere's logit_scale, ...) is folded into the fused KL exactly; what cannot be folded is refused by name."""
import pytest
import torch
from torch import nn

import fastvat

transformers = pytest.importorskip("transformers")

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)

# one tiny random model per family that transforms its logits in its forward (config attribute, value)
FAMILIES = {
    "granite": ("Granite", dict(logits_scaling=8.0)),  # logits / 8
    "cohere": ("Cohere", dict(logit_scale=0.0625)),  # logits * 0.0625
    "hyperclovax": ("HyperCLOVAX", dict(logits_scaling=0.25)),  # logits * 0.25
    "falcon_h1": ("FalconH1", dict(lm_head_multiplier=0.5, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
                                   mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=8, head_dim=8)),
    # the scaling divides the head's input, which the capture already holds: nothing to fold
    "minicpm3": ("MiniCPM3", dict(dim_model_base=8, kv_lora_rank=8, q_lora_rank=16, qk_nope_head_dim=4,
                                  qk_rope_head_dim=4, v_head_dim=8, num_key_value_heads=4)),
}


def tiny(family, *, bias=False):
    name, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, name + "ForCausalLM")(getattr(transformers, name + "Config")(**{**COMMON, **extra}))
    if bias:  # a head with a bias: the scale must reach it too
        model.lm_head = nn.Linear(32, VOCAB, bias=True)
    return model.double().eval()


def batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (3, 10), generator=g)
    am = torch.ones(3, 10, dtype=torch.long)
    am[1, 7:] = 0
    return ids, am


def loss_and_grads(model, reg, *args, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = reg(*args, **kwargs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    head = model.get_output_embeddings()
    grads["head.weight"] = head.weight.grad.clone()  # also when tied to the input embeddings (Cohere)
    if head.bias is not None:
        grads["head.bias"] = head.bias.grad.clone()
    return loss.detach(), grads


def assert_same(fused, unfused, rtol=1e-9):
    (lf, gf), (lu, gu) = fused, unfused
    torch.testing.assert_close(lf, lu, rtol=rtol, atol=0)
    assert gf.keys() == gu.keys()
    assert gu["head.weight"].abs().max() > 0
    for n in gu:
        torch.testing.assert_close(gf[n], gu[n], rtol=rtol, atol=rtol * gu[n].abs().max().item(), msg=n)


def make(kind, model, head):
    emb, g = model.get_input_embeddings(), torch.Generator().manual_seed(1)
    if kind == "vat":
        return fastvat.VAT(model, embedding=emb, head=head, eps=1.0, xi=1e-3, generator=g)
    return fastvat.RandomNoise(model, embedding=emb, head=head, sigma=1e-2, symmetric=True, generator=g)


@pytest.mark.parametrize("kind", ["vat", "noise_symmetric"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fused_loss_and_gradients_equal_the_unfused_path(family, kind):
    model = tiny(family)
    ids, am = batch()
    runs = [loss_and_grads(model, make(kind, model, h), ids, attention_mask=am)
            for h in (model.get_output_embeddings(), None)]
    assert runs[1][0] > 0
    assert_same(*runs)


@pytest.mark.parametrize("family", ["granite", "cohere"])
def test_bf16_fused_loss_matches_the_unfused_path_within_bf16(family):
    model = tiny(family).to(torch.bfloat16)
    ids, am = batch()
    fused, unfused = [fastvat.VAT(model, embedding=model.get_input_embeddings(), head=h, eps=1.0, xi=1.0,
                                  hvp="finite_difference", generator=torch.Generator().manual_seed(1))(
                          ids, attention_mask=am).detach() for h in (model.get_output_embeddings(), None)]
    torch.testing.assert_close(fused, unfused, rtol=0.05, atol=0)


@pytest.mark.parametrize("kind", ["vat", "noise_symmetric"])
def test_the_scale_reaches_the_heads_bias(kind):
    model = tiny("granite", bias=True)
    ids, am = batch()
    runs = [loss_and_grads(model, make(kind, model, h), ids, attention_mask=am)
            for h in (model.get_output_embeddings(), None)]
    assert runs[1][1]["head.bias"].abs().max() > 0
    assert_same(*runs)


class Wrapper(nn.Module):
    """A plain module around a language model: the transform is the inner model's (its config's)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask=None):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits


def test_the_transform_is_read_from_the_module_that_owns_the_head():
    lm = tiny("cohere")
    model = Wrapper(lm)
    ids, am = batch()
    emb = lm.get_input_embeddings()
    fused, unfused = [fastvat.VAT(model, embedding=emb, head=h, eps=1.0, xi=1e-3,
                                  generator=torch.Generator().manual_seed(1))(ids, attention_mask=am).detach()
                      for h in (lm.get_output_embeddings(), None)]
    torch.testing.assert_close(fused, unfused, rtol=1e-9, atol=0)


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**COMMON)
    return transformers.LlamaForCausalLM(cfg).double().eval()


@pytest.mark.parametrize("attr", ["final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap"])
def test_a_soft_cap_is_refused_by_its_config_attribute(attr):
    model = tiny_llama()
    setattr(model.config, attr, 30.0)
    head = model.get_output_embeddings()
    with pytest.raises(ValueError, match=f"soft-caps.*config.{attr}=30.0"):
        fastvat.VAT(model, embedding=model.get_input_embeddings(), head=head)
    assert "forward" not in head.__dict__


def test_gemma2_is_refused():
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**COMMON, head_dim=8))
    with pytest.raises(ValueError, match="config.final_logit_softcapping"):
        fastvat.RandomNoise(model, embedding=model.get_input_embeddings(), head=model.get_output_embeddings())


@pytest.mark.parametrize("attr", ["logits_scaling", "logit_scale", "lm_head_multiplier", "output_multiplier"])
def test_a_scale_on_a_model_type_not_in_the_table_is_refused(attr):
    """logits_scaling divides Granite's logits and multiplies HyperCLOVAX's: on an unknown model type the
    direction is unknown, so nothing is guessed."""
    model = tiny_llama()
    head = model.get_output_embeddings()
    setattr(model.config, attr, 1)  # the identity is the identity either way
    fastvat.VAT(model, embedding=model.get_input_embeddings(), head=head)
    setattr(model.config, attr, 8.0)
    with pytest.raises(ValueError, match=f"cannot tell how LlamaForCausalLM \\(model_type 'llama'\\) applies "
                                         f"config.{attr}=8.0"):
        fastvat.VAT(model, embedding=model.get_input_embeddings(), head=head)


def test_a_vocabulary_slice_is_refused():
    model = tiny_llama()
    head = model.get_output_embeddings()
    model.config.unpadded_vocab_size = VOCAB  # keeps every column
    fastvat.VAT(model, embedding=model.get_input_embeddings(), head=head)
    model.config.unpadded_vocab_size = VOCAB - 8
    with pytest.raises(ValueError, match="config.unpadded_vocab_size=56"):
        fastvat.VAT(model, embedding=model.get_input_embeddings(), head=head)


def test_prophetnets_ngram_streams_are_refused():
    """Its head runs on n streams of hidden states and the logits are the first stream's."""
    cfg = transformers.ProphetNetConfig(vocab_size=VOCAB, hidden_size=16, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                        num_encoder_layers=1, num_decoder_layers=1, num_encoder_attention_heads=2,
                                        num_decoder_attention_heads=2, ngram=2)
    model = transformers.ProphetNetForCausalLM(cfg)
    with pytest.raises(ValueError, match="config.ngram=2"):
        fastvat.VAT(model, embedding=model.get_input_embeddings(), head=model.get_output_embeddings())
    model.config.ngram = 1
    fastvat.VAT(model, embedding=model.get_input_embeddings(), head=model.get_output_embeddings())


@pytest.mark.parametrize("value", [0.0, float("inf")])
def test_a_scale_that_is_not_a_finite_nonzero_number_is_refused(value):
    model = tiny("granite")
    model.config.logits_scaling = value
    with pytest.raises(ValueError, match="config.logits_scaling"):
        fastvat.VAT(model, embedding=model.get_input_embeddings(), head=model.get_output_embeddings())


class PerTokenScaledHead(nn.Linear):
    """As Dory's head: a Linear whose forward scales each vocabulary entry's logit."""

    def __init__(self):
        super().__init__(32, VOCAB, bias=False)
        self.logit_scale = nn.Parameter(torch.full((VOCAB,), 2.0))

    def forward(self, h):
        return super().forward(h) * self.logit_scale


class NoForward:
    """A mixin that defines no forward, as FSDP2's wrapper class."""


def test_a_head_that_overrides_linear_forward_is_refused():
    model = tiny_llama()
    model.lm_head = PerTokenScaledHead().double()
    with pytest.raises(TypeError, match="PerTokenScaledHead overrides nn.Linear.forward"):
        fastvat.VAT(model, embedding=model.get_input_embeddings(), head=model.lm_head)
    model.lm_head.__class__ = type("FSDPLinear", (NoForward, nn.Linear), {})
    fastvat.VAT(model, embedding=model.get_input_embeddings(), head=model.lm_head)
