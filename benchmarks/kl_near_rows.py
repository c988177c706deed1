"""What the KL's accurate pass for nearby distributions costs inside the fused LM-head op.

``ops.linear_kl_div`` forward + backward over a 128k vocabulary, once with h_q far from h_p (ordinary
rows, KL ~ 5e-2) and once with h_q = h_p + 1e-4 noise (every row takes the small-difference pass, as
a VAT power step with a small xi does), timed interleaved (``timing.measure_many``); the ratio is the
median of per-round ratios.

    python benchmarks/kl_near_rows.py --out benchmarks/results/cpu_kl_near_rows
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import timing  # noqa: E402

from fastvat import ops  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="kl_near_rows")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=128256)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    w = torch.randn(args.vocab, args.hidden) * 0.02
    h = torch.randn(args.tokens, args.hidden)
    cases = {"far": (h + torch.randn_like(h)).requires_grad_(),
             "near": (h + 1e-4 * torch.randn_like(h)).requires_grad_()}

    def step(hq):
        def f():
            ops.linear_kl_div(h, hq, w).backward()
            hq.grad = None
        return f

    with torch.no_grad():
        kl = {k: float(ops.linear_kl_div(h, v, w)) for k, v in cases.items()}
    t = timing.measure_many({k: step(v) for k, v in cases.items()}, rounds=5, min_run_time=6.0)
    res = dict(command="python benchmarks/kl_near_rows.py " + " ".join(sys.argv[1:] if argv is None else argv),
               shape=dict(tokens=args.tokens, hidden=args.hidden, vocab=args.vocab), kl=kl,
               ms={k: v.ms for k, v in t.items()}, near_over_far=timing.paired_ratio(t["near"], t["far"]),
               load=t.load, machine=timing.machine_info("cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "near_rows.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: res[k] for k in ("kl", "ms", "near_over_far", "load")}, indent=1))


if __name__ == "__main__":
    main()
