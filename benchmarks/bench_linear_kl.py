"""Fused linear + KL (``fastvat.ops.linear_kl_div``) against the eager composition, forward + backward.

Eager: ``log_softmax(h W^T)`` for both sides (the clean one under no_grad; 16-bit logits upcast to
float32 for the loss, as model code does), ``F.kl_div(..., log_target=True)``, autograd. Fused: the
chunked op. Each variant runs in its own subprocess, so that its peak RSS growth (``ru_maxrss`` after
the steps minus the RSS before the first one) is its own; variants alternate over rounds, so that a
change of machine load hits both alike, and each ratio is the median of the per-round ratios.

    python benchmarks/bench_linear_kl.py [--tokens 2048 --hidden 256 --vocab 128256 --steps 3 --rounds 2]
                                         [--extra-chunks 256,1024]

``--extra-chunks`` adds fused variants at other chunk sizes (variant ``fused_c<size>``): larger chunks
make the per-chunk matmuls more efficient at the cost of a larger working set.

Writes benchmarks/results/linear_kl/<machine>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = ("float32", "bfloat16")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(args) -> dict:
    import torch
    import torch.nn.functional as F

    from fastvat import ops

    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    h_p = torch.randn(args.tokens, args.hidden, generator=g).to(dtype)
    h_q = (h_p.float() + 0.1 * torch.randn(args.tokens, args.hidden, generator=g)).to(dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=g) / args.hidden**0.5).to(dtype).requires_grad_()

    if args.variant == "eager":

        def step(h_p, h_q, weight):
            with torch.no_grad():
                lp = F.log_softmax((h_p @ weight.t()).float(), -1)
            lq = F.log_softmax((h_q @ weight.t()).float(), -1)
            loss = F.kl_div(lq, lp, reduction="batchmean", log_target=True)
            loss.backward()
            return loss

    else:

        chunk = int(args.variant[len("fused_c"):]) if args.variant.startswith("fused_c") else args.chunk_size

        def step(h_p, h_q, weight):
            loss = ops.linear_kl_div(h_p, h_q, weight, chunk_size=chunk)
            loss.backward()
            return loss

    # The first matmuls load and initialise libraries (hundreds of MB of RSS): a tiny step of the same
    # kind first, so that the measured growth is the step's working set.
    step(h_p[:8], h_q.detach()[:8].requires_grad_(), weight.detach()[:64].requires_grad_())
    rss_before = _rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    loss = None
    for _ in range(args.steps + 1):  # the first step warms up and is not timed
        h_q.grad = weight.grad = None
        t0 = time.perf_counter()
        loss = step(h_p, h_q, weight)
        times.append(time.perf_counter() - t0)
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "variant": args.variant,
        "dtype": args.dtype,
        "step_s": statistics.median(times[1:]),
        "step_s_all": times,
        "peak_rss_growth_bytes": peak_after - rss_before,
        "rss_before_bytes": rss_before,
        "peak_rss_before_bytes": peak_before,
        "loss": float(loss),
        "grad_weight_norm": float(weight.grad.float().norm()),
        "threads": torch.get_num_threads(),
        "backend": ops.BACKEND,
    }


def _run_variant(args, variant, dtype) -> dict:
    cmd = [
        sys.executable, os.path.abspath(__file__), "--worker", "--variant", variant, "--dtype", dtype,
        "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
        "--steps", str(args.steps),
    ]
    if args.chunk_size is not None:
        cmd += ["--chunk-size", str(args.chunk_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=os.path.dirname(HERE))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--extra-chunks", default="", help="comma-separated chunk sizes of extra fused variants")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(_worker(args)))
        return

    variants = ["eager", "fused"] + [f"fused_c{int(c)}" for c in args.extra_chunks.split(",") if c]
    runs = []
    summary = {}
    for dtype in args.dtypes.split(","):
        per_round = []
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else variants[::-1]
            res = {v: _run_variant(args, v, dtype) for v in order}
            for v in order:
                res[v]["round"] = r
                runs.append(res[v])
                print(f"{dtype:9s} round {r} {v:11s} step {res[v]['step_s']:.3f} s  "
                      f"peak RSS +{res[v]['peak_rss_growth_bytes'] / 2**20:.0f} MiB  loss {res[v]['loss']:.6f}",
                      flush=True)
            per_round.append(res)
        summary[dtype] = {"eager_step_s": statistics.median(r["eager"]["step_s"] for r in per_round),
                          "eager_peak_rss_growth_mib":
                              statistics.median(r["eager"]["peak_rss_growth_bytes"] for r in per_round) / 2**20}
        for v in variants[1:]:
            summary[dtype][v] = {
                "step_s": statistics.median(r[v]["step_s"] for r in per_round),
                "speedup_vs_eager": statistics.median(r["eager"]["step_s"] / r[v]["step_s"] for r in per_round),
                "peak_rss_growth_mib": statistics.median(r[v]["peak_rss_growth_bytes"] for r in per_round) / 2**20,
                "memory_ratio_vs_eager": statistics.median(
                    r[v]["peak_rss_growth_bytes"] / r["eager"]["peak_rss_growth_bytes"] for r in per_round
                ),
                "loss_rel_diff": abs(per_round[0][v]["loss"] - per_round[0]["eager"]["loss"])
                / abs(per_round[0]["eager"]["loss"]),
                "grad_weight_norm_rel_diff": abs(
                    per_round[0][v]["grad_weight_norm"] - per_round[0]["eager"]["grad_weight_norm"]
                ) / per_round[0]["eager"]["grad_weight_norm"],
            }
        print(json.dumps({dtype: summary[dtype]}, indent=1), flush=True)

    import torch

    from fastvat.ops.linear_kl import default_chunk_size

    result = {
        "config": {
            "tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab, "steps": args.steps,
            "rounds": args.rounds, "variants": variants,
            "chunk_size": args.chunk_size if args.chunk_size is not None else default_chunk_size(args.vocab),
        },
        "machine": {
            "platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "loadavg_end": os.getloadavg(),
        },
        "summary": summary,
        "runs": runs,
    }
    out = args.out or os.path.join(HERE, "results", "linear_kl", f"cpu_n{args.tokens}_h{args.hidden}_v{args.vocab}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
