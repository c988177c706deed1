"""fastvat against eager PyTorch and torch.compile: ops and a VAT training step in one run, one table,
and bench_<device>.json / .csv / .png in --out.

    python benchmarks/run.py [--smoke | --quick | --full] [--device cpu|cuda] [--out DIR]

Modes (sizes and repeats):
  --smoke   tiny shapes and models, one round, no torch.compile (seconds; for tests);
  --quick   the default shapes with fewer rounds, no sweep;
  default   the full op shapes except kl_div ([1024, 30522] instead of [4096, 30522]),
            bfloat16 for perturb_ and l2_normalize only on the CPU, torch.compile baselines for
            float32 ops, BERT step, weight target at 30k and 250k, one sweep point; about 3 minutes
            on 2 CPU threads (160 s in benchmarks/results/cpu_default, more on a busy machine);
  --full    the shapes the bars are stated for, more rounds, torch.compile everywhere (the step too), the MiniLM-L6
            model when installed, the full sweep, and the causal-LM suite (tens of minutes on 2 CPU
            threads).
Suites (--only): ops, step, and lm: a Llama-style causal LM with Llama 3's vocabulary, fastvat's
fused head (head=) against the naive VAT that builds the logits: step time, peak memory of a step,
largest batch under a memory cap (lm_bench.py; run by --full, or alone with --only lm: 27 minutes
for float32 and bfloat16 on 2 CPU threads of a busy machine, benchmarks/results/cpu_lm; with --smoke
a tiny model).
On a GPU (--device cuda) the op shapes are ≥ 64 M elements.

A row timed while other processes took CPU is marked busy, its bar verdict is withheld, and the
table and JSON say BUSY MACHINE (see timing.LoadWatch).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import lm_bench
import op_bench
import report
import step_bench
import timing


def _parser():
    ap = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.split("\n\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny shapes, a few seconds (for tests)")
    size.add_argument("--quick", action="store_true", help="fewer rounds, no sweep")
    size.add_argument("--full", action="store_true", help="the bars' shapes, torch.compile of the step, "
                                                           "MiniLM and the full sweep (long)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default="bench_out", help="folder for bench_<device>.json/.csv/.png")
    ap.add_argument("--only", choices=["ops", "step", "lm"], help="run one suite (lm: only with --only or --full)")
    ap.add_argument("--cases", help=f"op cases, comma-separated (default: all of {','.join(op_bench.CASES)})")
    ap.add_argument("--dtypes", help="op and lm dtypes, comma-separated (default: float32,bfloat16; smoke: float32)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--budget", type=float, help="seconds after which no more torch.compile is tried")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def _progress(enabled):
    """tick(label) for each case, the tqdm bar on stderr (or None), and the (label, start) of every phase."""
    phases = []
    bar = None
    if enabled:
        from tqdm import tqdm

        bar = tqdm(total=1, desc="fastvat bench", unit="case", file=sys.stderr, dynamic_ncols=True, leave=False)

    def tick(label):
        phases.append((label, time.perf_counter()))
        if bar is not None:
            if len(phases) > 1 and bar.n < bar.total:
                bar.update(1)
            bar.set_description(label[:50])

    return tick, bar, phases


def run(*, device="cpu", mode="default", out="bench_out", compile=None, progress=True, only=None, cases=None,
        dtypes=None, budget=None):
    timing.stable_malloc()
    start = time.perf_counter()
    quick = mode == "quick"
    size_mode = "default" if quick else mode
    if compile is None:
        compile = mode in ("default", "full")
    dtypes = dtypes or (("float32", "bfloat16") if mode != "smoke" else ("float32",))
    suites = set(only or (("ops", "step", "lm") if mode == "full" else ("ops", "step")))
    cases = tuple(cases or op_bench.CASES)
    threads = torch.get_num_threads()
    if mode == "smoke":
        torch.set_num_threads(1)  # tiny shapes: a second thread only adds synchronisation
    used_threads = torch.get_num_threads()
    tick, bar, phases = _progress(progress)

    octx = op_bench.Ctx(device, size_mode, quick=quick, compile=compile, dtypes=dtypes, progress=tick,
                        compile_cap_s=60.0 if mode != "full" else 180.0,
                        compile_deadline=None if budget is None else start + budget)
    if mode != "full":
        octx.compile_dtypes = (torch.float32,)
        if torch.device(device).type == "cpu":
            octx.half_cases = ("perturb", "l2")  # bf16 kl_div and gather_add: --full
    sctx = step_bench.Ctx(device, size_mode, quick=quick, compile=(mode == "full" and compile), progress=tick,
                          minilm=(mode == "full"))
    if quick:
        sctx.cfg["sweep"] = {}
    lctx = lm_bench.Ctx(device, mode, dtypes=dtypes, progress=tick)
    if bar is not None:
        bar.total = max((op_bench.plan_size(octx, cases) if "ops" in suites else 0)
                        + (step_bench.plan_size(sctx) if "step" in suites else 0)
                        + (lm_bench.plan_size(lctx) if "lm" in suites else 0), 1)
        bar.refresh()

    stem = f"bench_{torch.device(device).type}"
    title = f"fastvat vs baselines ({mode} mode, {torch.device(device).type})"
    config = {"device": str(device), "mode": mode, "compile": compile, "suites": sorted(suites),
              "cases": list(cases), "dtypes": list(dtypes), "budget_s": budget,
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    if "lm" in suites:
        config["lm"] = dict(lctx.cfg, rounds=lctx.rounds, min_reps=lctx.min_reps, bars=lm_bench.BARS)
    load_start = timing.loadavg()

    def machine(elapsed=None):
        m = timing.machine_info(device)
        m.update(torch_threads=used_threads, load_average_1m_at_start=load_start,
                 elapsed_s=None if elapsed is None else round(elapsed, 1))
        return m

    def save_partial(rows):
        # a run killed by a time limit keeps what it measured
        report.write_outputs(out, stem, rows, machine(), config, title, png=False)

    rows, checks = [], []
    try:
        if "ops" in suites:
            orows = op_bench.run(octx, cases, on_rows=save_partial)
            rows += orows
            checks += op_bench.summary_checks(orows)
        if "step" in suites:
            srows, schecks = step_bench.run(sctx, sweep=bool(sctx.cfg["sweep"]))
            rows += srows
            checks += schecks
        if "lm" in suites:
            lrows, lchecks = lm_bench.run(lctx)
            rows += lrows
            checks += lchecks
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.update(bar.total - bar.n)
            bar.close()
    end = time.perf_counter()
    config["phase_seconds"] = {label: round(t1 - t0, 1)
                               for (label, t0), (_, t1) in zip(phases, phases[1:] + [(None, end)])}
    rows += checks
    m = machine(end - start)
    print(report.machine_line(m))
    print(report.format_table(rows))
    paths = report.write_outputs(out, stem, rows, m, config, title)
    print(f"wrote {', '.join(paths.values())}  ({end - start:.0f} s)")
    return rows, paths


def main(argv=None):
    ap = _parser()
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda was given but no CUDA GPU is available (torch.cuda.is_available() is False)")
    unknown = set(args.cases.split(",") if args.cases else ()) - set(op_bench.CASES)
    if unknown:
        ap.error(f"unknown --cases {sorted(unknown)}; choose from {','.join(op_bench.CASES)}")
    if args.dtypes and not all(isinstance(getattr(torch, d, None), torch.dtype) for d in args.dtypes.split(",")):
        ap.error(f"--dtypes takes torch dtype names such as float32,bfloat16; got {args.dtypes!r}")
    mode = "full" if args.full else "smoke" if args.smoke else "quick" if args.quick else "default"
    run(device=args.device, mode=mode, out=args.out, compile=(False if args.no_compile else None),
        progress=not args.no_progress, only=[args.only] if args.only else None,
        cases=args.cases.split(",") if args.cases else None, dtypes=args.dtypes.split(",") if args.dtypes else None,
        budget=args.budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
