"""A causal LM's VAT step: fastvat with the head fused (``head=``) against the naive eager VAT that builds
the [B, T, V] logits, on a random-init Llama-style model (no download), in float32 and bfloat16 (bf16:
the model's weights in bf16).

  naive     ``baselines.NaiveVAT(lean=True)`` on the input embeddings' output: its own clean forward,
            the full logits in the model's dtype for every pass, ``F.kl_div`` on them, and a power step
            that takes ``torch.autograd.grad`` with respect to r only. The lean form is the fair
            baseline here: the blog snippet's full ``backward()`` + ``zero_grad`` in the power step
            also allocates every weight gradient in the power step, a cost of the snippet, not of
            building the logits;
  fastvat   ``fastvat.VAT(model, embedding=model.get_input_embeddings(), head=model.get_output_embeddings())``
            (output target): the head's logits are never built (``ops.linear_kl_div``).

Both use the output target's default xi and eps and one power iteration; a step is
``zero_grad(set_to_none=True)``, the VAT call and ``backward()``. The batch is B sequences of T random
tokens, no padding and no labels: every position's prediction counts, for both. Measured per dtype:

1. step time: both variants in this process, interleaved (``timing.measure_many`` with the quick
   settings: a step takes seconds); the ratio naive / fastvat is paired round by round; bar >= 1.5.
2. peak memory of one step, each variant in a fresh subprocess that builds the model and the batch,
   runs one small step of the same variant (1 x 16 tokens: the libraries load and initialise),
   sets the gradients to None, then takes one full step: the peak RSS during that step (VmHWM reset
   through /proc/self/clear_refs) minus the RSS just before it. It counts the step's activations,
   logits and temporaries and the parameter gradients the step allocates; bar fastvat <= 0.35 x naive.
3. the largest batch under a memory cap: B = 1, 2, 4, ... (up to ``max_batch``), one subprocess and
   one step per probe, measured as in 2; the search stops at the first B whose peak passes the cap
   (the probe is stopped as soon as it does, so a failing probe is cheap).

    python benchmarks/run.py --only lm [--dtypes float32] [--out DIR]     (also a part of --full)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import threading
import time

import torch

import timing
from report import check, row
from timing import paired_ratio as ratio

HERE = os.path.dirname(os.path.abspath(__file__))
MIB = 2**20

SIZES = {
    # tiny: the code paths only; memory numbers of a model this small say nothing
    "smoke": {"layers": 1, "hidden": 32, "intermediate": 64, "heads": 2, "vocab": 1000, "batch": 2, "seq": 16,
              "cap_mib": 512, "max_batch": 4},
    # Llama 3's vocabulary, where the logits dominate the step. The cap is set so that the naive step
    # passes it within the first few batch sizes on a 24 GiB machine; a fastvat probe at max_batch
    # takes minutes on 2 CPU cores.
    "default": {"layers": 2, "hidden": 256, "intermediate": 688, "heads": 4, "vocab": 128256, "batch": 4,
                "seq": 512, "cap_mib": 3072, "max_batch": 32},
}

BARS = {"speed": 1.5, "memory": 0.35}
VARIANTS = ("naive", "fastvat")


class Ctx:
    def __init__(self, device="cpu", mode="default", dtypes=("float32", "bfloat16"), progress=None, seed=0):
        self.device = torch.device(device)
        self.mode = "smoke" if mode == "smoke" else "default"
        self.cfg = dict(SIZES[self.mode])
        self.dtypes = tuple(dtypes)
        self.progress = progress
        self.seed = seed
        # a step is seconds to tens of seconds on a CPU: one timed call per variant per round
        if mode == "smoke":
            self.min_run_time, self.min_reps, self.rounds = 0.0, 1, 1
        else:
            self.min_run_time, self.min_reps, self.rounds = 0.5, 2, 2

    def tick(self, label):
        if self.progress is not None:
            self.progress(label)


# ---------------------------------------------------------------------------------------------
# the model, the batch and the two steps (shared by this process and the workers)
# ---------------------------------------------------------------------------------------------
def llama(cfg, dtype, device, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM  # lazy: bench-only dependency

    torch.manual_seed(seed)
    conf = LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
                       num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                       num_key_value_heads=cfg["heads"], max_position_embeddings=max(cfg["seq"], 64),
                       tie_word_embeddings=False, use_cache=False)
    model = LlamaForCausalLM(conf).to(device=device, dtype=getattr(torch, dtype))
    return model.train()


def lm_batch(vocab, batch_size, seq, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch_size, seq), generator=g)
    return ids.to(device), torch.ones_like(ids).to(device)


def make_step(model, variant):
    """step(ids, am) for one variant, and a close() that removes its hooks."""
    import fastvat
    from baselines import NaiveVAT

    d = fastvat.vat.DEFAULTS["output"]
    emb = model.get_input_embeddings()
    if variant == "fastvat":
        reg = fastvat.VAT(model, embedding=emb, head=model.get_output_embeddings(), xi=d["xi"], eps=d["eps"], iters=1)
        close = lambda: None  # noqa: E731
    elif variant == "naive":
        reg = NaiveVAT(model, emb, xi=d["xi"], eps=d["eps"], iters=1, lean=True)
        close = reg.close
    else:
        raise ValueError(f"unknown variant {variant!r}")

    def step(ids, am):
        model.zero_grad(set_to_none=True)
        loss = reg(ids, attention_mask=am)
        loss.backward()
        return loss

    return step, close


def shape_text(cfg, batch_size):
    return (f"Llama L{cfg['layers']} H{cfg['hidden']} I{cfg['intermediate']} V{cfg['vocab']} "
            f"B{batch_size} T{cfg['seq']}")


# ---------------------------------------------------------------------------------------------
# one step's peak memory, in a worker process
# ---------------------------------------------------------------------------------------------
def _status_kb(key):
    return timing._proc_status_kb(key)


def _peak_of_step(fn, cap_bytes, report_over):
    """(peak bytes above the RSS before the call, how it was measured). With ``cap_bytes``, a watcher
    thread ends the process through ``report_over(peak)`` as soon as the peak passes the cap (torch
    releases the GIL inside its ops, so the watcher runs while the step does)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        how = "VmHWM after /proc/self/clear_refs - VmRSS before"
    except OSError:
        how = "ru_maxrss after - VmRSS before (an upper bound when the process peaked higher before)"
    base = _status_kb("VmRSS")
    stop = threading.Event()

    def watch():
        while not stop.wait(0.02):
            hwm = _status_kb("VmHWM")
            if hwm is not None and (hwm - base) * 1024 > cap_bytes:
                report_over((hwm - base) * 1024)

    watcher = None
    if cap_bytes and base is not None and how.startswith("VmHWM"):
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
    try:
        fn()
    finally:
        stop.set()
        if watcher is not None:
            watcher.join()
    if how.startswith("VmHWM"):
        peak = _status_kb("VmHWM")
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(peak - base, 0) * 1024, how


def _worker(spec) -> dict:
    timing.stable_malloc()
    cfg, device = spec["cfg"], torch.device(spec["device"])
    model = llama(cfg, spec["dtype"], device, spec["seed"])
    ids, am = lm_batch(cfg["vocab"], spec["batch"], cfg["seq"], device)
    step, _ = make_step(model, spec["variant"])
    small_ids, small_am = lm_batch(cfg["vocab"], 1, min(16, cfg["seq"]), device)
    step(small_ids, small_am)
    model.zero_grad(set_to_none=True)
    out = {"variant": spec["variant"], "dtype": spec["dtype"], "batch": spec["batch"],
           "threads": torch.get_num_threads()}
    cap = spec.get("cap_bytes")

    def over(peak):
        out.update(over_cap=True, peak_bytes=peak, note="stopped when the peak passed the cap")
        print(json.dumps(out), flush=True)
        os._exit(0)

    t0 = time.perf_counter()
    if device.type == "cuda":
        peak, how = timing.peak_extra_bytes(lambda: step(ids, am), device=device), "max_memory_allocated"
    else:
        peak, how = _peak_of_step(lambda: step(ids, am), cap, over)
    out.update(step_s=time.perf_counter() - t0, peak_bytes=peak, how=how,
               over_cap=bool(cap) and peak > cap)
    return out


def run_worker(ctx, variant, dtype, batch_size, cap_bytes=None) -> dict:
    spec = {"cfg": ctx.cfg, "device": str(ctx.device), "dtype": dtype, "variant": variant, "batch": batch_size,
            "seed": ctx.seed, "cap_bytes": cap_bytes}
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(HERE))
    lines = [ln for ln in p.stdout.strip().splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        # killed (e.g. by the kernel's OOM killer) or failed: no measurement
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {"variant": variant, "dtype": dtype, "batch": batch_size, "error": f"rc={p.returncode}: {tail}",
                "over_cap": True, "peak_bytes": None}
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------
# the suite
# ---------------------------------------------------------------------------------------------
def _time_steps(ctx, dtype):
    cfg = ctx.cfg
    model = llama(cfg, dtype, ctx.device, ctx.seed)
    ids, am = lm_batch(cfg["vocab"], cfg["batch"], cfg["seq"], ctx.device)
    steps, closes = {}, []
    for v in VARIANTS:
        fn, close = make_step(model, v)
        steps[v] = (lambda fn=fn: fn(ids, am))
        closes.append(close)
    try:
        return timing.measure_many(steps, device=ctx.device, min_run_time=ctx.min_run_time, rounds=ctx.rounds,
                                   min_reps=ctx.min_reps)
    finally:
        for c in closes:
            c()
        del model
        gc.collect()


def _largest_batch(ctx, variant, dtype, cap_bytes):
    """(largest B that fit, the probes); B = 0 when even one sequence passes the cap."""
    probes, best, b = [], 0, 1
    while b <= ctx.cfg["max_batch"]:
        r = run_worker(ctx, variant, dtype, b, cap_bytes)
        probes.append(r)
        if r.get("over_cap"):
            break
        best = b
        b *= 2
    return best, probes


def _mib(x):
    return None if x is None else x / MIB


def _probe_text(probes):
    def one(p):
        if p.get("error"):
            return f"B{p['batch']} {p['error']}"
        # a probe stopped at the cap reports the peak it had reached then
        return f"B{p['batch']} {'>' if p.get('over_cap') else ''}{_mib(p['peak_bytes']):.0f}"
    return ", ".join(one(p) for p in probes)


def run_dtype(ctx, dtype):
    cfg = ctx.cfg
    shape = shape_text(cfg, cfg["batch"])
    ctx.tick(f"LM {dtype}: naive and fastvat steps (timed)")
    res = _time_steps(ctx, dtype)
    n, f = res["naive"], res["fastvat"]
    speed = ratio(n, f)
    busy = res.load["busy"]

    ctx.tick(f"LM {dtype}: peak memory of one step (subprocesses)")
    mem = {v: run_worker(ctx, v, dtype, cfg["batch"]) for v in VARIANTS}
    peaks = {v: mem[v].get("peak_bytes") for v in VARIANTS}
    mem_ratio = peaks["fastvat"] / peaks["naive"] if peaks["naive"] and peaks["fastvat"] is not None else None

    cap = cfg["cap_mib"] * MIB
    ctx.tick(f"LM {dtype}: largest batch under {cfg['cap_mib']} MiB (subprocesses)")
    largest = {v: _largest_batch(ctx, v, dtype, cap) for v in VARIANTS}
    (bn, pn), (bf, pf) = largest["naive"], largest["fastvat"]

    def most(b):  # the search stopped at max_batch: the largest batch is at least this
        return f"{b}+" if b >= cfg["max_batch"] else f"{b}"

    label = "fp32" if dtype == "float32" else "bf16" if dtype == "bfloat16" else dtype
    r = row(suite="lm", case=f"LM VAT step (head=) {label}", shape=shape, dtype=dtype, device=ctx.device.type,
            baseline="lean naive eager VAT", baseline_ms=n.ms, baseline_iqr_ms=n.iqr_ms, fastvat_ms=f.ms,
            fastvat_iqr_ms=f.iqr_ms, speedup=speed, baseline_peak_mb=_mib(peaks["naive"]),
            fastvat_peak_mb=_mib(peaks["fastvat"]), value=mem_ratio,
            note=(f"value = fastvat / naive peak RSS growth of one step; largest batch under {cfg['cap_mib']} MiB: "
                  f"naive {most(bn)}, fastvat {most(bf)}; naive's logits in the model's "
                  f"dtype; {mem['fastvat'].get('how', '')}"),
            **res.load)
    mem_name = (f"LM {label}: fastvat / naive peak memory ({_mib(peaks['fastvat']) or 0:.0f} / "
                f"{_mib(peaks['naive']) or 0:.0f} MiB)")
    batch_name = (f"LM {label}: largest batch under {cfg['cap_mib']} MiB, fastvat / naive "
                  f"({most(bf)} / {most(bn)})")
    checks = [
        check(f"LM {label}: naive / fastvat step time", speed, f">={BARS['speed']}", speed >= BARS["speed"],
              busy=busy),
        # memory is per process: another process's load does not change it
        check(mem_name, mem_ratio, f"<={BARS['memory']}", None if mem_ratio is None else mem_ratio <= BARS["memory"],
              note=mem["naive"].get("error") or mem["fastvat"].get("error")),
        check(batch_name, (bf / bn) if bn else None, None, None,
              note=f"peak MiB per probe: naive {_probe_text(pn)}; fastvat {_probe_text(pf)}"),
    ]
    return [r], checks, {"largest": {v: largest[v][1] for v in VARIANTS}, "memory": mem}


def plan_size(ctx):
    return 3 * len(ctx.dtypes)


def run(ctx):
    rows, checks = [], []
    for dtype in ctx.dtypes:
        rws, chs, _ = run_dtype(ctx, dtype)
        rows += rws
        checks += chs
    if ctx.mode == "smoke":  # the bars are stated for the Llama config, not a tiny one
        for ch in checks:
            ch["bar"], ch["bar_met"] = None, None
    return rows, checks


def peak_memory(dtypes, out_dir):
    """Only part 2 (peak memory of one step, naive and fastvat, default sizes), into
    ``out_dir/peak_memory.json``: minutes instead of the suite's half hour."""
    import platform

    ctx = Ctx(mode="default", dtypes=tuple(dtypes))
    t0 = time.perf_counter()
    results = []
    for dtype in ctx.dtypes:
        for variant in VARIANTS:
            r = run_worker(ctx, variant, dtype, ctx.cfg["batch"])
            r["peak_mib"] = _mib(r.get("peak_bytes"))
            print(json.dumps(r), flush=True)
            results.append(r)
    doc = {"what": "peak RSS growth of one VAT step, each variant in its own subprocess (lm_bench.py part 2); "
                   "naive = baselines.NaiveVAT(lean=True)",
           "cfg": ctx.cfg, "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.processor() or
           platform.machine(), "torch": torch.__version__, "load_average_1m": os.getloadavg()[0],
           "elapsed_s": round(time.perf_counter() - t0, 1), "results": results}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "peak_memory.json"), "w") as f:
        json.dump(doc, f, indent=1)
    return doc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--peak-memory", metavar="DTYPES",
                    help="only the peak memory of one step, for these dtypes (comma-separated), into --out")
    ap.add_argument("--out", default="bench_out", help="folder for peak_memory.json (with --peak-memory)")
    args = ap.parse_args(argv)
    if args.peak_memory:
        peak_memory(args.peak_memory.split(","), args.out)
        return 0
    if args.worker is None:
        ap.error("run the suite through benchmarks/run.py --only lm (or --peak-memory float32 --out DIR)")
    print(json.dumps(_worker(json.loads(args.worker))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
