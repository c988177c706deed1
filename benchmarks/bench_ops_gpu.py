#!/usr/bin/env python3
"""GPU benchmark of the fastvat CUDA ops against the eager PyTorch composition (fastvat.reference)
and torch.compile of that reference, with a same-run copy_ bandwidth as the ceiling.

    python benchmarks/bench_ops_gpu.py --out OUTDIR/gpu_ops.json [--budget 200] [--quick] [--no-compile]

Timing: CUDA events around each call, the L2 flushed (a 256 MB write) before every call and
outside the timed region, median over many repeats after a warm-up. "GB/s" counts the minimal
bytes the op must move (read each input once, write each output once; the per-case note says
what was counted) and "%copy" compares that rate with `dst.copy_(src)` measured in the same run.
Phase 1 times fastvat and eager for every case; phase 2 adds torch.compile while the time
budget lasts (compilation is slow), so a budget cut only loses compile rows. JSON and markdown
are rewritten after every case, so a killed run keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
class Timer:
    def __init__(self, torch, reps, warmup, device="cuda"):
        self.torch = torch
        self.reps = reps
        self.warmup = warmup
        self.cuda = device == "cuda"
        n = 64 * 1024 * 1024 if self.cuda else 1024 * 1024
        self.flush = torch.empty(n, dtype=torch.float32, device=device)  # 256 MB > L2

    def __call__(self, fn):
        torch = self.torch
        t = time.perf_counter()
        for _ in range(self.warmup):
            fn()
        sync(torch, self.cuda)
        per_call = (time.perf_counter() - t) / max(self.warmup, 1)
        reps = self.reps
        if per_call > 0.02:  # slow (eager on big tensors): fewer repeats
            reps = max(5, min(reps, int(1.0 / per_call)))
        if not self.cuda:  # CPU smoke run of this script: wall clock
            ts = []
            for _ in range(reps):
                self.flush.zero_()
                t = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t) * 1e3)
            return summarize(ts, reps)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            self.flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)], reps)


def summarize(ts, reps):
    ts = sorted(ts)
    q = statistics.quantiles(ts, n=4) if len(ts) >= 4 else [ts[0], ts[len(ts) // 2], ts[-1]]
    return {"ms": statistics.median(ts), "q1": q[0], "q3": q[2], "reps": reps}


def sync(torch, cuda):
    if cuda:
        torch.cuda.synchronize()


def copy_bandwidth(torch, timer, device, nbytes=2 * 1024**3):
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    st = timer(lambda: dst.copy_(src))
    gbps = 2 * nbytes / (st["ms"] * 1e-3) / 1e9
    del src, dst
    if device == "cuda":
        torch.cuda.empty_cache()
    return gbps, st


# ---------------------------------------------------------------------------------------------
# cases: each returns dict(op, case, dtype, bytes, note, impls={name: fn}, compile=make_fn|None,
# check=fn -> max relative error of fastvat vs reference)
# ---------------------------------------------------------------------------------------------
def dt_name(dt):
    return str(dt).replace("torch.", "").replace("float32", "fp32").replace("bfloat16", "bf16")


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def case_perturb(torch, ops, ref, dtype, size, dev):
    V, H = {"full": (250000, 1024), "quick": (50000, 1024), "tiny": (500, 64)}[size]
    w = torch.randn(V, H, device=dev, dtype=dtype)
    d = torch.randn(V, H, device=dev, dtype=dtype)
    prev = torch.zeros(V, H, device=dev, dtype=dtype)
    n, es = V * H, w.element_size()

    def fast():
        ops.perturb_(w, d, scale=1.0, previous=prev)

    def eager():
        ref.perturb_(w, d, 1.0, previous=prev)

    def make_compiled():
        def f(w_, d_, p_):
            ref.perturb_(w_, d_, 1.0, previous=p_)

        c = torch.compile(f)
        return lambda: c(w, d, prev)

    def check():
        out = torch.empty_like(w)
        wc = w.clone()
        ops.perturb_(wc, d, scale=1.0, out=out)
        e = rel_err(out, ref.l2_normalize(d, scale=1.0, norm="global"))
        del out, wc
        return e

    return dict(op="perturb_", case=f"[{V},{H}] previous", dtype=dt_name(dtype), bytes=5 * n * es,
                note="r d,w,prev + w w,prev", impls={"fastvat": fast, "eager": eager},
                compile=make_compiled, check=check, tensors=[w, d, prev])


def case_l2(torch, ops, ref, dtype, norm, size, dev):
    B, T, H = {"full": (256, 512, 1024), "quick": (64, 512, 1024), "tiny": (4, 16, 64)}[size]
    x = torch.randn(B, T, H, device=dev, dtype=dtype)
    g = torch.Generator(device=dev).manual_seed(0)
    mask = None
    if norm != "global":
        lengths = torch.randint(T // 4, T + 1, (B,), device=dev, generator=g)
        mask = torch.arange(T, device=dev)[None, :] < lengths[:, None]  # [B, T] padding mask
    n, es = x.numel(), x.element_size()

    def fast():
        return ops.l2_normalize(x, scale=1.0, norm=norm, mask=mask)

    def eager():
        return ref.l2_normalize(x, scale=1.0, norm=norm, mask=mask)

    def make_compiled():
        c = torch.compile(lambda x_, m_: ref.l2_normalize(x_, scale=1.0, norm=norm, mask=m_))
        return lambda: c(x, mask)

    def check():
        return rel_err(fast(), eager())

    return dict(op="l2_normalize", case=f"{norm}{' +mask' if mask is not None else ''} [{B},{T},{H}]",
                dtype=dt_name(dtype), bytes=2 * n * es + (0 if mask is None else B * T), note="r x + w out",
                impls={"fastvat": fast, "eager": eager}, compile=make_compiled, check=check, tensors=[x, mask])


def case_kl(torch, ops, ref, dtype, N, C, size, dev):
    if size == "quick":
        N = max(1, N // 4)
    elif size == "tiny":
        N, C = max(1, N // 256), C // 64
    p = torch.randn(N, C, device=dev, dtype=dtype) * 2
    q = (torch.randn(N, C, device=dev, dtype=dtype) * 2).requires_grad_()
    n, es = N * C, p.element_size()

    def fast():
        loss = ops.kl_div_with_logits(p, q)
        return torch.autograd.grad(loss, q)[0]

    def fused_op():
        return torch.ops.fastvat.kl_div_with_logits(p, q.detach(), None, True)

    def eager():
        loss = ref.kl_div_with_logits(p, q)
        return torch.autograd.grad(loss, q)[0]

    def make_compiled():
        c = torch.compile(ref.kl_div_with_logits)

        def run():
            return torch.autograd.grad(c(p, q), q)[0]

        return run

    def check():
        g1, g2 = fast(), eager()
        l1, l2 = ops.kl_div_with_logits(p, q.detach()), ref.kl_div_with_logits(p, q.detach())
        return max(rel_err(g1, g2), abs(l1.item() - l2.item()) / max(abs(l2.item()), 1e-30))

    impls = {"fastvat": fast, "fastvat op (loss+grad)": fused_op, "eager": eager}
    for variant in ("cached", "stream", "stream512"):  # the kernel variants (FASTVAT_KL_VARIANT)
        impls[f"fastvat op [{variant}]"] = (fused_op, {"FASTVAT_KL_VARIANT": variant})
    return dict(op="kl_div fwd+bwd", case=f"[{N},{C}]", dtype=dt_name(dtype), bytes=3 * n * es,
                note="r p,q + w grad (autograd adds a scaling pass)", impls=impls,
                compile=make_compiled, check=check, tensors=[p, q])


def case_gather(torch, ops, ref, dtype, size, dev):
    V, H = {"full": (250000, 1024), "quick": (50000, 1024), "tiny": (1000, 64)}[size]
    B, T = (8, 32) if size == "tiny" else (64, 512)
    g = torch.Generator(device=dev).manual_seed(0)
    # Zipf-like ids with padding (id 0) at the end of each sequence: long and short segments.
    ranks = torch.rand(B, T, device=dev, generator=g).pow(3.0)
    ids = (ranks * (V - 1)).long() + 1
    lengths = torch.randint(T // 2, T + 1, (B,), device=dev, generator=g)
    ids = torch.where(torch.arange(T, device=dev)[None, :] < lengths[:, None], ids, torch.zeros_like(ids))
    uniq, inv = torch.unique(ids, return_inverse=True)
    U = uniq.numel()
    w = torch.randn(V, H, device=dev, dtype=dtype).requires_grad_()
    delta = (torch.randn(U, H, device=dev, dtype=dtype) * 0.01).requires_grad_()
    go = torch.randn(B, T, H, device=dev, dtype=dtype)
    N, es = B * T, w.element_size()

    def fwd_fast():
        return ops.embedding_gather_add(w, ids, delta, inv, padding_idx=0)

    def fwd_eager():
        return ref.embedding_gather_add(w, ids, delta, inv, 0)

    def fast():
        return torch.autograd.grad(fwd_fast(), (w, delta), go)

    def eager():
        return torch.autograd.grad(fwd_eager(), (w, delta), go)

    def make_compiled():
        c = torch.compile(ref.embedding_gather_add)
        return lambda: torch.autograd.grad(c(w, ids, delta, inv, 0), (w, delta), go)

    def check():
        a, b = fast(), eager()
        return max(rel_err(fwd_fast(), fwd_eager()), rel_err(a[0], b[0]), rel_err(a[1], b[1]))

    fwd_bytes = 3 * N * H * es
    bwd_bytes = N * H * es + V * H * es + U * H * es
    return dict(op="gather_add fwd+bwd", case=f"ids[{B},{T}] W[{V},{H}] U={U}", dtype=dt_name(dtype),
                bytes=fwd_bytes + bwd_bytes, note="fwd r 2 rows w out; bwd r grad, w dense gW + gD",
                impls={"fastvat": fast, "eager": eager, "fastvat fwd only": fwd_fast, "eager fwd only": fwd_eager},
                bytes_of={"fastvat fwd only": fwd_bytes, "eager fwd only": fwd_bytes},
                compile=make_compiled, check=check, tensors=[w, delta, go, ids, inv])


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------
def write_outputs(path_json, path_md, meta, rows):
    with open(path_json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [
        f"# fastvat GPU ops — {meta.get('device', '?')}",
        "",
        f"torch {meta.get('torch')}, copy_ bandwidth {meta.get('copy_gbps', float('nan')):.0f} GB/s "
        f"(read+write), L2 flushed before each call, median of N calls.",
        "",
        "| op | case | dtype | impl | ms | GB/s | % copy | vs eager | max rel err | note |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['case']} | {r['dtype']} | {r['impl']} | {fmt(r.get('ms'), 3)} | {fmt(r.get('gbps'), 0)} "
            f"| {fmt(r.get('pct_copy'), 0)} | {fmt(r.get('speedup_vs_eager'), 2, 'x')} | {fmt(r.get('max_rel_err'), 1, 'e')} "
            f"| {r.get('error') or r.get('note', '')} |"
        )
    with open(path_md, "w") as f:
        f.write("\n".join(lines) + "\n")


def fmt(v, nd, kind=""):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if kind == "e":
        return f"{v:.{nd}e}"
    if kind == "x":
        return f"{v:.{nd}f}x"
    return f"{v:.{nd}f}"


def print_table(rows, copy_gbps):
    print(f"\n== fastvat GPU ops (copy_ {copy_gbps:.0f} GB/s; GB/s = minimal bytes / median time) ==")
    hdr = f"{'op':<19}{'case':<34}{'dt':<5}{'impl':<24}{'ms':>9}{'GB/s':>7}{'%cp':>5}{'vsEag':>9}{'err':>9}"
    print(hdr)
    for r in rows:
        err = r.get("error")
        line = (f"{r['op'][:18]:<19}{r['case'][:33]:<34}{r['dtype']:<5}{r['impl'][:23]:<24}"
                f"{fmt(r.get('ms'), 3):>9}{fmt(r.get('gbps'), 0):>7}{fmt(r.get('pct_copy'), 0):>5}"
                f"{fmt(r.get('speedup_vs_eager'), 2, 'x'):>9}{fmt(r.get('max_rel_err'), 1, 'e'):>9}")
        if err:
            line += "  ERR " + err[:60]
        print(line)


# ---------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_ops.json", help="JSON output path (markdown goes next to it, .md)")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--budget", type=float, default=240.0, help="seconds; torch.compile rows stop when spent")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--quick", action="store_true", help="smaller tensors (a smoke run)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu only smoke-tests this script (with --tiny); the numbers mean nothing there")
    ap.add_argument("--tiny", action="store_true", help="tiny tensors (script smoke test)")
    ap.add_argument("--only", default="perturb,l2,kl,gather", help="comma list of perturb,l2,kl,gather")
    args = ap.parse_args(argv)

    import torch

    dev = args.device
    size = "tiny" if args.tiny else ("quick" if args.quick else "full")
    if dev == "cuda" and not torch.cuda.is_available():
        print("bench_ops_gpu: no CUDA GPU is visible; this benchmark needs one (nothing measured).", file=sys.stderr)
        return 2
    import fastvat
    from fastvat import ops
    from fastvat import reference as ref

    info = fastvat.extension_info()
    log("extension:", info)
    if not info.get("cuda_kernels"):
        log("WARNING: fastvat CUDA kernels are not loaded; 'fastvat' rows run the reference fallback")

    out_json = os.path.abspath(args.out)
    out_md = os.path.splitext(out_json)[0] + ".md"
    os.makedirs(os.path.dirname(out_json), exist_ok=True)
    if dev == "cuda":
        props = torch.cuda.get_device_properties(0)
        dname, sms = props.name, props.multi_processor_count
    else:
        dname, sms = "cpu", 0
    timer = Timer(torch, args.reps, args.warmup, dev)
    copy_gbps, cst = copy_bandwidth(torch, timer, dev, 2 * 1024**3 if size == "full" else 64 * 1024**2)
    meta = dict(device=dname, sms=sms, torch=torch.__version__, cuda=torch.version.cuda, copy_gbps=copy_gbps,
                copy_ms=cst["ms"], extension=info, reps=args.reps, size=size)
    log(f"device {dname}, {sms} SMs; copy_ {copy_gbps:.0f} GB/s")

    only = set(args.only.split(","))
    makers = []
    for dt in (torch.float32, torch.bfloat16):
        if "perturb" in only:
            makers.append(lambda dt=dt: case_perturb(torch, ops, ref, dt, size, dev))
        if "l2" in only:
            for norm in ("global", "sample", "token"):
                makers.append(lambda dt=dt, norm=norm: case_l2(torch, ops, ref, dt, norm, size, dev))
        if "kl" in only:
            for N, C in ((4096, 32000), (512, 131072)):
                makers.append(lambda dt=dt, N=N, C=C: case_kl(torch, ops, ref, dt, N, C, size, dev))
        if "gather" in only:
            makers.append(lambda dt=dt: case_gather(torch, ops, ref, dt, size, dev))

    rows = []

    def record(c, impl, st=None, err=None, eager_ms=None, check=None):
        nbytes = c.get("bytes_of", {}).get(impl, c["bytes"])
        r = dict(op=c["op"], case=c["case"], dtype=c["dtype"], impl=impl, note=c["note"], bytes=nbytes)
        if st is not None:
            r.update(st)
            r["gbps"] = nbytes / (st["ms"] * 1e-3) / 1e9
            r["pct_copy"] = 100.0 * r["gbps"] / copy_gbps
            if eager_ms:
                r["speedup_vs_eager"] = eager_ms / st["ms"]
        if check is not None:
            r["max_rel_err"] = check
        if err:
            r["error"] = err
        rows.append(r)
        write_outputs(out_json, out_md, meta, rows)
        return r

    # Phase 1: fastvat and eager.
    pending_compile = []
    for make in makers:
        c = None
        try:
            c = make()
            log(f"case {c['op']} {c['case']} {c['dtype']}")
            check = None
            try:
                check = c["check"]()
            except Exception as exc:  # noqa: BLE001
                log("  check failed:", repr(exc)[:200])
            res = {}
            for impl, fn in c["impls"].items():
                env = {}
                if isinstance(fn, tuple):  # (fn, environment variables to set while timing it)
                    fn, env = fn
                saved = {k: os.environ.get(k) for k in env}
                try:
                    os.environ.update(env)
                    res[impl] = timer(fn)
                except Exception as exc:  # noqa: BLE001
                    res[impl] = exc
                    log(f"  {impl} failed: {exc!r}"[:300])
                finally:
                    for k, v in saved.items():
                        if v is None:
                            os.environ.pop(k, None)
                        else:
                            os.environ[k] = v
            for impl in c["impls"]:
                v = res[impl]
                ref_impl = "eager fwd only" if "fwd only" in impl else "eager"
                e = res.get(ref_impl)
                eager_ms = e["ms"] if isinstance(e, dict) else None
                if isinstance(v, dict):
                    r = record(c, impl, v, eager_ms=eager_ms if impl != ref_impl else None,
                               check=check if impl == "fastvat" else None)
                    log(f"  {impl:<24} {v['ms']:9.3f} ms  {r['gbps']:7.0f} GB/s  {r['pct_copy']:4.0f}% copy")
                else:
                    record(c, impl, err=repr(v)[:200])
            if c.get("compile") is not None and not args.no_compile:
                e = res.get("eager")
                pending_compile.append((make, e["ms"] if isinstance(e, dict) else None))
        except Exception as exc:  # noqa: BLE001
            log("case failed:", repr(exc)[:300])
            traceback.print_exc()
        finally:
            del c
            if dev == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()

    # Phase 2: torch.compile of the reference, while the budget lasts.
    for make, eager_ms in pending_compile:
        left = args.budget - (time.time() - T0)
        if left < 30:
            log(f"compile budget spent ({args.budget:.0f} s): skipping the remaining torch.compile rows")
            break
        c = None
        try:
            torch._dynamo.reset()
            c = make()
            log(f"compile {c['op']} {c['case']} {c['dtype']}")
            t = time.time()
            fn = c["compile"]()
            fn()  # compiles
            sync(torch, dev == "cuda")
            log(f"  compiled in {time.time() - t:.1f} s")
            st = timer(fn)
            r = record(c, "torch.compile(ref)", st, eager_ms=eager_ms)
            log(f"  {'torch.compile(ref)':<24} {st['ms']:9.3f} ms  {r['gbps']:7.0f} GB/s  {r['pct_copy']:4.0f}% copy")
        except Exception as exc:  # noqa: BLE001
            log("  compile failed:", repr(exc)[:300])
            if c is not None:
                record(c, "torch.compile(ref)", err=("compile failed: " + repr(exc))[:200])
        finally:
            del c
            if dev == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()

    rows.sort(key=lambda r: (r["op"], r["case"], r["dtype"]))
    write_outputs(out_json, out_md, meta, rows)
    print_table(rows, copy_gbps)
    log(f"wrote {out_json} and {out_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
