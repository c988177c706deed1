"""``python -m fastvat bench``: ops + training step (+ sweep) in one run, one table, JSON/CSV/PNG.

Modes (sizes and repeats):
  --smoke   tiny shapes and models, one repeat, no torch.compile (seconds; for tests);
  --quick   the default shapes with fewer repeats, no sweep;
  default   op shapes of the issues except kl_div ([1024, 30522] instead of [4096, 30522]),
            bfloat16 for perturb_ and l2_normalize only, torch.compile baselines for float32 ops,
            BERT step, weight mode at 30k and 250k, one sweep point; under 3 minutes on 2 CPU threads;
  --full    the issues' shapes, more repeats, torch.compile everywhere (the step too), the
            MiniLM-L6 model when installed, the full sweep (tens of minutes on 2 CPU threads).
"""
from __future__ import annotations

import os
import sys
import time

import torch

from fastvat.bench import op_bench, step_bench, timing


def run(*, device="cpu", mode="default", quick=False, out="bench_out", compile=None, progress=True,
        only=None, stream=None):
    stream = stream or sys.stdout
    timing.stable_malloc()
    op_mode = {"smoke": "smoke", "quick": "default", "default": "default", "full": "full"}[mode]
    step_mode = {"smoke": "smoke", "quick": "default", "default": "default", "full": "full"}[mode]
    quick = quick or mode == "quick"
    if compile is None:
        compile = mode in ("default", "full")
    dtypes = ("float32", "bfloat16") if mode != "smoke" else ("float32",)
    threads = torch.get_num_threads()
    if mode == "smoke":
        torch.set_num_threads(1)  # tiny shapes: a second thread only adds synchronisation
    used_threads = torch.get_num_threads()
    suites = set(only or ("ops", "step"))

    bar = None
    phases = []  # (label, start time): where the run spent its time, written to the JSON

    if progress:
        from tqdm import tqdm

        bar = tqdm(total=1, desc="fastvat bench", unit="case", file=sys.stderr, dynamic_ncols=True, leave=False)

    def ticker(label):
        phases.append((label, time.perf_counter()))
        if bar is not None:
            if len(phases) > 1 and bar.n < bar.total:
                bar.update(1)
            bar.set_description(label[:50])

    octx = op_bench.Ctx(device, op_mode, quick=quick, compile=compile, dtypes=dtypes, progress=ticker,
                        compile_cap_s=60.0 if mode != "full" else 180.0)
    if mode != "full":
        octx.compile_dtypes = (torch.float32,)
        octx.half_cases = ("perturb", "l2")  # bf16 kl_div and gather_add: --full
    sctx = step_bench.Ctx(device, step_mode, quick=quick, compile=(mode == "full" and compile is not False),
                          progress=ticker, minilm=(mode == "full"))
    if mode == "quick":
        sctx.cfg["sweep"] = {}
    total = (op_bench.plan_size(octx) if "ops" in suites else 0) + (step_bench.plan_size(sctx) if "step" in suites else 0)
    if bar is not None:
        bar.total = max(total, 1)
        bar.refresh()

    start = time.perf_counter()
    load_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    rows, checks = [], []
    try:
        if "ops" in suites:
            orows = op_bench.run(octx)
            rows += orows
            checks += op_bench.summary_checks(orows)
        if "step" in suites:
            srows, schecks = step_bench.run(sctx, sweep=bool(sctx.cfg["sweep"]))
            rows += srows
            checks += schecks
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.update(bar.total - bar.n)
            bar.close()
    end = time.perf_counter()
    elapsed = end - start
    phase_s = {label: round(t1 - t0, 1) for (label, t0), (_, t1) in zip(phases, phases[1:] + [(None, end)])}
    rows += checks
    machine = timing.machine_info(device)
    machine["torch_threads"] = used_threads
    machine["elapsed_s"] = round(elapsed, 1)
    machine["load_average_1m_at_start"] = load_start
    config = {"device": str(device), "mode": mode, "quick": quick, "compile": compile, "suites": sorted(suites),
              "phase_seconds": phase_s}
    print(timing.machine_line(machine), file=stream)
    print(timing.format_table(rows), file=stream)
    paths = timing.write_outputs(out, f"bench_{torch.device(device).type}", rows, machine, config,
                                 title=f"fastvat vs baselines ({mode} mode, {torch.device(device).type})")
    print(f"wrote {', '.join(paths.values())}  ({elapsed:.0f} s)", file=stream)
    return rows, paths
