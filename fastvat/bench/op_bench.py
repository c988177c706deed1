"""Each fastvat op against the eager PyTorch composition it replaces, and torch.compile of the
fastvat.reference function, in the same run, with a same-run ``copy_`` bandwidth.

Bytes counted for GB/s ("minimal bytes the op must move", N = elements, s = element size):
  perturb_           6·N·s: the global norm needs the whole direction before any element of the
                     update can be written, so a streaming kernel reads d twice (norm pass, then
                     update pass), plus w and previous read once and both written once.
  l2_normalize       sample/token: 2·N·s (one group fits in cache: read x once, write once);
                     global: 3·N·s (two passes over x, as for perturb_). Mask bytes added.
  kl_div_with_logits forward + backward: 3·N·s (read p and q once, write the gradient once).
  embedding_gather_add forward + backward: read T gathered rows, T delta rows, write T rows;
                     backward read T gradient rows, write the dense [V, H] weight gradient and
                     the [U, H] delta gradient.
``% of copy`` divides that rate by the same-run rate of ``dst.copy_(src)`` moving the same bytes.

Peak memory (KL case): extra peak over the level before one forward + backward call, see
``timing.peak_extra_bytes`` (CPU: peak resident set via /proc; CUDA: max_memory_allocated).
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from fastvat.bench import timing
from fastvat.bench.timing import check, row

# Shapes per mode. "full" is the issues' shapes (the bars are stated for them).
SIZES = {
    "smoke": {"perturb": (4096, 128), "l2": (4, 32, 64), "kl": (64, 2000), "gather": ((2000, 64), (4, 32))},
    "default": {"perturb": (30522, 768), "l2": (32, 128, 768), "kl": (1024, 30522), "gather": ((30522, 768), (32, 128))},
    "full": {"perturb": (30522, 768), "l2": (32, 128, 768), "kl": (4096, 30522), "gather": ((30522, 768), (32, 128)),
             # one very long row: the CPU kernel's column-span split (float32 only)
             "kl_long": (1, 1_000_000)},
}

# Bars from the issues (CPU, float32, at the "full" shapes).
BARS = {
    "perturb_": {"speedup": 2.5, "pct_copy": 80.0},
    "l2_normalize sample masked": {"speedup": 1.3},
    "kl_div fwd+bwd": {"speedup": 2.0, "mem_ratio": 0.5},
}


class Ctx:
    """Run settings shared by every case."""

    def __init__(self, device="cpu", mode="default", quick=False, compile=True, compile_cap_s=90.0,
                 dtypes=("float32", "bfloat16"), progress=None, seed=0):
        self.device = torch.device(device)
        self.mode = mode
        self.sizes = SIZES[mode]
        self.quick = quick
        self.compile = compile
        self.compile_cap_s = compile_cap_s
        self.dtypes = [getattr(torch, d) if isinstance(d, str) else d for d in dtypes]
        self.compile_dtypes = tuple(self.dtypes)
        self.half_cases = None  # cases run for bfloat16/float16 (None: all)
        self.progress = progress
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        # min_run_time: seconds of timing per variant, spread over `rounds` interleaved rounds
        if mode == "smoke":
            self.min_run_time, self.rounds = 0.02, 1
        elif quick:
            self.min_run_time, self.rounds = 0.3, 2
        elif mode == "full":
            self.min_run_time, self.rounds = 2.0, 4
        else:
            self.min_run_time, self.rounds = 0.6, 3

    def randn(self, *shape, dtype=torch.float32):
        return torch.randn(*shape, generator=self.gen, dtype=torch.float32).to(device=self.device, dtype=dtype)

    def time(self, fn):
        return timing.measure(fn, device=self.device, min_run_time=self.min_run_time)

    def tick(self, label):
        if self.progress is not None:
            self.progress(label)


def _dtname(dt):
    return str(dt).replace("torch.", "")


def _shape(*dims):
    return "x".join(str(d) for d in dims)


def _compare(ctx, *, case, shape, dtype, baseline_name, baseline, fastvat_fn, compiled_fn=None,
             compiled_warm=None, nbytes=None, bar=None, note=None):
    """Baseline, fastvat, torch.compile of the reference and a same-byte ``copy_``, timed
    interleaved in the same run; one row."""
    ctx.last_compiled = None
    fns = {"baseline": baseline, "fastvat": fastvat_fn}
    compiled_note = None
    if compiled_fn is not None and ctx.compile and dtype in ctx.compile_dtypes:
        compiled, compiled_note = timing.try_compile(compiled_fn, compiled_warm, cap_s=ctx.compile_cap_s)
        ctx.last_compiled = compiled
        if compiled is not None:
            fns["compiled"] = lambda: compiled_warm(compiled)
    elif compiled_fn is not None:
        compiled_note = "skipped" if not ctx.compile else "skipped (float32 only in this mode; --full)"
    copy_bufs = None
    if nbytes:
        n = max(int(nbytes) // 8, 1)  # float32 src and dst: reads + writes = nbytes
        # src written (touched) so the copy reads real pages; dst is touched by the warm-up call
        copy_bufs = (torch.full((n,), 1.5, device=ctx.device), torch.empty(n, device=ctx.device))
        src, dst = copy_bufs
        fns["copy"] = lambda: dst.copy_(src)
    st = timing.measure_many(fns, device=ctx.device, min_run_time=ctx.min_run_time, rounds=ctx.rounds)
    b, f = st["baseline"], st["fastvat"]
    r = row(suite="ops", case=case, shape=shape, dtype=_dtname(dtype), device=ctx.device.type,
            baseline=baseline_name, baseline_ms=b.ms, baseline_iqr_ms=b.iqr_ms,
            fastvat_ms=f.ms, fastvat_iqr_ms=f.iqr_ms, speedup=b.median / f.median, note=note,
            compiled_note=compiled_note)
    if "compiled" in st:
        r["compiled_ms"] = st["compiled"].ms
        r["speedup_vs_compiled"] = st["compiled"].median / f.median
    if nbytes:
        gbps = nbytes / f.median / 1e9
        copy_gbps = 8 * max(int(nbytes) // 8, 1) / st["copy"].median / 1e9
        r.update(gbps=gbps, copy_gbps=copy_gbps, pct_copy=100.0 * gbps / copy_gbps)
    del copy_bufs
    if bar and ctx.mode != "smoke":  # the bars are stated for the issues' shapes; smoke shapes are tiny
        r["bar"] = bar
    return r


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------
def case_perturb(ctx, dtype):
    from fastvat import ops
    from fastvat import reference as ref

    V, H = ctx.sizes["perturb"]
    scale = 1.0
    w = ctx.randn(V, H, dtype=dtype)
    d = ctx.randn(V, H, dtype=dtype)
    state = {"prev": torch.zeros_like(w)}

    def eager():
        new = scale * d / torch.linalg.vector_norm(d)
        w.add_(new).sub_(state["prev"])
        state["prev"] = new

    prev = torch.zeros_like(w)

    def fast():
        ops.perturb_(w, d, scale=scale, previous=prev)

    prev_c = torch.zeros_like(w)

    def comp_src(w_, d_, p_):
        return ref.perturb_(w_, d_, scale, previous=p_)

    s = w.element_size()
    bars = BARS["perturb_"]
    r = _compare(ctx, case="perturb_ (reuse previous)", shape=_shape(V, H), dtype=dtype,
                 baseline_name="eager norm+add_+sub_", baseline=eager, fastvat_fn=fast,
                 compiled_fn=comp_src, compiled_warm=lambda c: c(w, d, prev_c), nbytes=6 * V * H * s,
                 bar=(f">={bars['speedup']}x & >={bars['pct_copy']:.0f}% copy" if dtype == torch.float32 else None))
    if r["bar"]:
        r["bar_met"] = r["speedup"] >= bars["speedup"] and r["pct_copy"] >= bars["pct_copy"]
    return [r]


def case_l2(ctx, dtype, norm):
    from fastvat import ops
    from fastvat import reference as ref

    B, T, H = ctx.sizes["l2"]
    x = ctx.randn(B, T, H, dtype=dtype)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=ctx.gen)
    m = (torch.arange(T)[None, :] < lengths[:, None]).to(ctx.device)
    if norm == "sample":
        def eager():
            v = x * m[..., None]
            return v / torch.linalg.vector_norm(v, dim=(1, 2), keepdim=True)
        base_name = "eager x*m / vector_norm(dim=(1,2))"
    elif norm == "token":
        def eager():
            return F.normalize(x * m[..., None], dim=-1)
        base_name = "eager F.normalize(x*m, dim=-1)"
    else:
        def eager():
            v = x * m[..., None]
            return v / torch.linalg.vector_norm(v)
        base_name = "eager x*m / vector_norm()"

    def fast():
        return ops.l2_normalize(x, norm=norm, mask=m)

    def comp_src(x_, m_):
        return ref.l2_normalize(x_, 1.0, norm, m_)

    s = x.element_size()
    passes = 3 if norm == "global" else 2
    nbytes = passes * x.numel() * s + m.numel() * m.element_size()
    bar = None
    if norm == "sample" and dtype == torch.float32:
        bar = f">={BARS['l2_normalize sample masked']['speedup']}x"
    r = _compare(ctx, case=f"l2_normalize {norm} masked", shape=_shape(B, T, H), dtype=dtype,
                 baseline_name=base_name, baseline=eager, fastvat_fn=fast, compiled_fn=comp_src,
                 compiled_warm=lambda c: c(x, m), nbytes=nbytes, bar=bar)
    if r["bar"]:
        r["bar_met"] = r["speedup"] >= BARS["l2_normalize sample masked"]["speedup"]
    return [r]


def case_kl(ctx, dtype, key="kl"):
    from fastvat import ops
    from fastvat import reference as ref

    B, V = ctx.sizes[key]
    p = ctx.randn(B, V, dtype=dtype)
    q = ctx.randn(B, V, dtype=dtype).requires_grad_(True)

    def eager():
        q.grad = None
        F.kl_div(F.log_softmax(q, dim=-1), F.softmax(p, dim=-1), reduction="batchmean").backward()

    def fast():
        q.grad = None
        ops.kl_div_with_logits(p, q, reduction="batchmean").backward()

    def comp_src(p_, q_):
        return ref.kl_div_with_logits(p_, q_, None, "batchmean")

    def comp_warm(c):
        q.grad = None
        c(p, q).backward()

    bars = BARS["kl_div fwd+bwd"]
    is_bar = dtype == torch.float32 and key == "kl"
    r = _compare(ctx, case="kl_div_with_logits fwd+bwd", shape=_shape(B, V), dtype=dtype,
                 baseline_name="eager log_softmax+kl_div+bwd", baseline=eager, fastvat_fn=fast,
                 compiled_fn=comp_src, compiled_warm=comp_warm, nbytes=3 * B * V * p.element_size(),
                 bar=(f">={bars['speedup']}x & peak<={bars['mem_ratio']}x eager" if is_bar else None))
    # Extra peak memory of one forward+backward (after the timing runs, so nothing is first-time).
    q.grad = None
    mb = 1024.0 ** 2
    eb = timing.peak_extra_bytes(eager, device=ctx.device)
    q.grad = None
    fb = timing.peak_extra_bytes(fast, device=ctx.device)
    q.grad = None
    if eb is not None and fb is not None:
        r["baseline_peak_mb"], r["fastvat_peak_mb"] = eb / mb, fb / mb
    compiled = getattr(ctx, "last_compiled", None)
    if r["compiled_ms"] is not None and compiled is not None:
        cb = timing.peak_extra_bytes(lambda: comp_warm(compiled), device=ctx.device)
        r["compiled_peak_mb"] = None if cb is None else cb / mb
        q.grad = None
    if r["bar"]:
        mem_ok = (eb is not None and fb is not None and fb <= bars["mem_ratio"] * eb)
        r["bar_met"] = r["speedup"] >= bars["speedup"] and mem_ok
        if (B, V) != SIZES["full"]["kl"]:
            r["note"] = "bar stated for 4096x30522 (--full)"
    return [r]


def case_gather(ctx, dtype):
    from fastvat import ops
    from fastvat import reference as ref

    (V, H), (B, T) = ctx.sizes["gather"]
    w = ctx.randn(V, H, dtype=dtype).requires_grad_(True)
    ids = torch.randint(0, V, (B, T), generator=ctx.gen).to(ctx.device)
    rows, inv = torch.unique(ids, sorted=True, return_inverse=True)
    delta = ctx.randn(rows.numel(), H, dtype=dtype).requires_grad_(True)
    g = ctx.randn(B, T, H, dtype=dtype)

    def eager():
        w.grad = delta.grad = None
        (F.embedding(ids, w) + delta[inv]).backward(g)

    def fast():
        w.grad = delta.grad = None
        ops.embedding_gather_add(w, ids, delta, inv).backward(g)

    def comp_src(w_, ids_, d_, inv_):
        return ref.embedding_gather_add(w_, ids_, d_, inv_, -1)

    def comp_warm(c):
        w.grad = delta.grad = None
        c(w, ids, delta, inv).backward(g)

    s = w.element_size()
    U = rows.numel()
    nbytes = (3 * B * T * H + B * T * H + V * H + U * H) * s + 2 * ids.numel() * ids.element_size()
    r = _compare(ctx, case="embedding_gather_add fwd+bwd", shape=f"{_shape(V, H)} ids {_shape(B, T)}",
                 dtype=dtype, baseline_name="eager F.embedding + delta[idx] + bwd", baseline=eager,
                 fastvat_fn=fast, compiled_fn=comp_src, compiled_warm=comp_warm, nbytes=nbytes)
    return [r]


def _plan(ctx, cases):
    plan = []
    for dt in ctx.dtypes:
        wanted = cases if dt == torch.float32 or ctx.half_cases is None else [c for c in cases if c in ctx.half_cases]
        if "perturb" in wanted:
            plan.append((f"perturb_ {_dtname(dt)}", lambda dt=dt: case_perturb(ctx, dt)))
        if "l2" in wanted:
            for norm in ("sample", "token", "global"):
                plan.append((f"l2_normalize {norm} {_dtname(dt)}", lambda dt=dt, n=norm: case_l2(ctx, dt, n)))
        if "kl" in wanted:
            plan.append((f"kl_div fwd+bwd {_dtname(dt)}", lambda dt=dt: case_kl(ctx, dt)))
        if "kl_long" in wanted and "kl_long" in ctx.sizes and dt == torch.float32:
            plan.append((f"kl_div fwd+bwd long row {_dtname(dt)}", lambda dt=dt: case_kl(ctx, dt, "kl_long")))
        if "gather" in wanted:
            plan.append((f"gather_add fwd+bwd {_dtname(dt)}", lambda dt=dt: case_gather(ctx, dt)))
    return plan


def run(ctx, cases=("perturb", "l2", "kl", "kl_long", "gather")):
    """All op cases for the dtypes of ``ctx``; returns rows (each case's errors become a note)."""
    rows = []
    for label, fn in _plan(ctx, cases):
        ctx.tick(label)
        try:
            rows.extend(fn())
        except Exception as exc:  # noqa: BLE001 - one broken case must not lose the others
            rows.append(row(suite="ops", case=label, device=ctx.device.type,
                            note=f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}"))
    return rows


def plan_size(ctx, cases=("perturb", "l2", "kl", "kl_long", "gather")):
    return len(_plan(ctx, cases))


def summary_checks(rows):
    """The bars of the issues, as 'check' rows (only for rows that carry a bar)."""
    out = []
    for r in rows:
        if r.get("bar") and r["suite"] == "ops":
            val = r["speedup"]
            out.append(check(f"{r['case']} {r['dtype']} speedup", val, r["bar"], r.get("bar_met"), r.get("note")))
    return out


# ---------------------------------------------------------------------------------------------
# script entry (benchmarks/bench_ops.py)
# ---------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description="fastvat ops vs eager PyTorch and torch.compile")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--mode", default="full", choices=list(SIZES), help="shapes (full = the issues' shapes)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile baselines")
    ap.add_argument("--compile-cap", type=float, default=120.0, help="seconds allowed per torch.compile")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--cases", default="perturb,l2,kl,kl_long,gather")
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args(argv)
    timing.stable_malloc()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_ops: error: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 2
    ctx = Ctx(args.device, args.mode, args.quick, not args.no_compile, args.compile_cap,
              args.dtypes.split(","), progress=lambda s: print(f"[ops] {s}", file=sys.stderr, flush=True))
    rows = run(ctx, tuple(args.cases.split(",")))
    rows += summary_checks(rows)
    machine = timing.machine_info(args.device)
    print(timing.machine_line(machine))
    print(timing.format_table(rows))
    paths = timing.write_outputs(args.out, f"ops_{args.device}", rows, machine, vars(args))
    print("wrote " + ", ".join(paths.values()))
    return 0
