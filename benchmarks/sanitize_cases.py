#!/usr/bin/env python3
"""One small, awkward call of every fastvat CUDA kernel path, checked against fastvat.reference.

Meant to run under `compute-sanitizer --tool memcheck` (with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so
out-of-bounds accesses inside the caching allocator's blocks are caught), and useful plainly as a
quick path-coverage check: odd sizes (not multiples of the vector width), misaligned views
(scalar fallback), masks of every granularity, row kernels and the two-kernel (partials + scale)
path, cached and uncached KL rows, gather/segment-sum with segments that cross chunk edges.

    python benchmarks/sanitize_cases.py [--dtypes fp32,bf16,fp16,fp64]

Exit status 1 if any result is off (the messages say which), 2 without a GPU.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}
FAILS = []


def close(name, a, b, dtype, rtol=None):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if a.shape != b.shape:
        FAILS.append(f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        print(f"FAIL {name}: shape {tuple(a.shape)} vs {tuple(b.shape)}", flush=True)
        return
    rtol = TOL[dtype] if rtol is None else rtol
    scale = b.abs().max().item() if b.numel() else 0.0
    err = (a - b).abs().max().item() if b.numel() else 0.0
    ok = err <= rtol * max(scale, 1e-30) + 1e-30 and bool(torch.isfinite(a).all() == torch.isfinite(b).all())
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max abs err {err:.3e} (scale {scale:.3e})", flush=True)
    if not ok:
        FAILS.append(name)


def misaligned(t):
    """The same values in a view whose data pointer is one element past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    v = flat[1:].view(t.shape)
    v.copy_(t)
    return v


def run(dtypes, dev="cuda"):
    from fastvat import ops
    from fastvat import reference as ref

    g = torch.Generator(device=dev).manual_seed(0)

    def rn(*shape, dtype, scale=1.0):
        return (torch.randn(*shape, device=dev, generator=g) * scale).to(dtype)

    for dt in dtypes:
        n = str(dt).replace("torch.", "")
        # ---------------- l2_normalize ----------------
        cases = {
            "3x5x7 mask[3,5] baseline": (rn(3, 5, 7, dtype=dt), rn(3, 5, 7, dtype=dt),
                                         torch.rand(3, 5, device=dev, generator=g) > 0.4),
            "3x4x37 elementwise mask": (rn(3, 4, 37, dtype=dt), None,
                                        (torch.rand(3, 4, 37, device=dev, generator=g) > 0.5)),
            "4x3001 (block rows)": (rn(4, 3001, dtype=dt), None, None),
            "150x3001 (block rows, many)": (rn(150, 3001, dtype=dt), None, torch.rand(150, device=dev, generator=g) > 0.2),
            "2x40001 baseline (chunks)": (rn(2, 40001, dtype=dt), rn(2, 40001, dtype=dt), None),
            "5x3x11001 mask[5,3]": (rn(5, 3, 11001, dtype=dt), None, torch.rand(5, 3, device=dev, generator=g) > 0.3),
        }
        for cname, (x, b, m) in cases.items():
            for norm in ("global", "sample", "token"):
                mm = None if m is None else m.to(dt)
                out = ops.l2_normalize(x, scale=2.0, norm=norm, mask=m, baseline=b)
                exp = ref.l2_normalize(x, scale=2.0, norm=norm, mask=mm, baseline=b)
                close(f"l2 {n} {cname} {norm}", out, exp, dt)
        x = rn(6, 129, dtype=dt)
        xm = misaligned(x)
        for norm in ("global", "sample", "token"):
            close(f"l2 {n} misaligned 6x129 {norm}", ops.l2_normalize(xm, norm=norm),
                  ref.l2_normalize(x, norm=norm), dt)
        # ---------------- perturb_ ----------------
        for shape in [(37, 23), (1000, 1001)]:
            w0, d, p = rn(*shape, dtype=dt), rn(*shape, dtype=dt), rn(*shape, dtype=dt, scale=0.01)
            w, prev = w0.clone(), p.clone()
            wr, prevr = w0.clone(), p.clone()
            ops.perturb_(w, d, scale=1.5, previous=prev)
            ref.perturb_(wr, d, 1.5, previous=prevr)
            close(f"perturb {n} {shape} delta", prev, prevr, dt)
            close(f"perturb {n} {shape} weight", w, wr, dt)
        w0, d = rn(37, 23, dtype=dt), rn(37, 23, dtype=dt)
        wm, dm = misaligned(w0), misaligned(d)
        new = ops.perturb_(wm, dm, scale=1.0)
        close(f"perturb {n} misaligned new", new, ref.l2_normalize(d, norm="global"), dt)
        close(f"perturb {n} misaligned weight", wm, w0.double() + new.double(), dt)
        if dt != torch.float32:  # a float32 direction for a weight of this dtype
            w, d32 = rn(64, 40, dtype=dt), rn(64, 40, dtype=torch.float32)
            wr = w.clone()
            new = ops.perturb_(w, d32, scale=1.0)
            newr = ref.perturb_(wr, d32, 1.0)
            tol = max(TOL[dt], TOL[torch.float32])  # new is rounded to the direction's dtype
            close(f"perturb {n} w / fp32 direction", w, wr, dt, rtol=tol)
            close(f"perturb {n} new / fp32 direction", new, newr, dt, rtol=tol)
        # ---------------- kl_div_with_logits ----------------
        kl_cases = [((5, 7), "auto"), ((9, 1023), "auto"), ((3, 5000), "auto"), ((2, 20001), "auto"),
                    ((2, 70001), "auto"), ((3, 5000), "stream"), ((2, 20001), "cached"), ((3, 5000), "stream512")]
        for shape, variant in kl_cases:
            p, q = rn(*shape, dtype=dt, scale=2.0), rn(*shape, dtype=dt, scale=2.0)
            mask = torch.rand(shape[0], device=dev, generator=g) > 0.3
            mask[0] = True
            mask[-1] = False
            if variant == "auto":
                kl_op = torch.ops.fastvat.kl_div_with_logits
            else:
                shape = shape + (variant,)
                kl_op = functools.partial(torch.ops.fastvat._kl_div_with_logits_variant, variant=variant)
            for m in (None, mask):
                accd = torch.float64 if dt == torch.float64 else torch.float32
                mf = None if m is None else m.to(accd)
                for want_grad in (True, False):
                    rows, grad = kl_op(p, q, mf, want_grad)
                    rows_r = ref.kl_div_with_logits(p, q, mask=m, reduction="none")
                    close(f"kl {n} {shape} mask={m is not None} grad={want_grad} rows", rows, rows_r, accd,
                          rtol=1e-9 if accd == torch.float64 else 1e-4)
                    if want_grad:
                        ga = torch.softmax(q.to(accd), -1) - torch.softmax(p.to(accd), -1)
                        if mf is not None:
                            ga = ga * mf[:, None]
                        close(f"kl {n} {shape} mask={m is not None} grad", grad, ga.to(dt), dt)
        p, q = rn(4, 301, dtype=dt), rn(4, 301, dtype=dt)
        rows, grad = torch.ops.fastvat.kl_div_with_logits(misaligned(p), misaligned(q), None, True)
        close(f"kl {n} misaligned rows", rows, ref.kl_div_with_logits(p, q, reduction="none"),
              torch.float64 if dt == torch.float64 else torch.float32, rtol=1e-4)
        # ---------------- embedding_gather_add (+ backward) ----------------
        for H in (13, 16, 64):
            V, U = 50, 7
            wgt = rn(V, H, dtype=dt)
            delta = rn(U, H, dtype=dt, scale=0.1)
            ids = torch.randint(0, V, (3, 70), device=dev, generator=g)
            ids[:, 40:] = 0  # a long padding segment: crosses several 32-token chunks once sorted
            ids[1, :20] = 5
            di = torch.randint(0, U, (3, 70), device=dev, generator=g)
            for idt in (torch.int64, torch.int32):
                out = ops.embedding_gather_add(wgt, ids.to(idt), delta, di.to(idt), padding_idx=0)
                close(f"gather {n} H={H} {idt} fwd", out, wgt[ids] + delta[di], dt)
            go = rn(3, 70, H, dtype=dt)
            gw, gd = torch.ops.fastvat.embedding_gather_add_backward(go, ids, di, V, U, 0, True, True)
            gw_r = torch.zeros(V, H, dtype=torch.float64, device=dev).index_add_(0, ids.reshape(-1), go.reshape(-1, H).double())
            gw_r[0] = 0
            gd_r = torch.zeros(U, H, dtype=torch.float64, device=dev).index_add_(0, di.reshape(-1), go.reshape(-1, H).double())
            close(f"gather {n} H={H} bwd weight", gw, gw_r.to(dt), dt)
            close(f"gather {n} H={H} bwd delta", gd, gd_r.to(dt), dt)
        if dev == "cuda":
            torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="fp32,bf16,fp16,fp64")
    ap.add_argument("--device", default="cuda", help="cpu: smoke-test this script on the CPU kernels")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("sanitize_cases: no CUDA GPU is visible", file=sys.stderr)
        return 2
    import fastvat

    info = fastvat.extension_info()
    print("extension:", info, flush=True)
    if args.device == "cuda" and not info.get("cuda_kernels"):
        print("FAIL: fastvat CUDA kernels are not loaded", flush=True)
        return 1
    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
    run([names[s] for s in args.dtypes.split(",") if s], args.device)
    print(f"\n{len(FAILS)} failing checks" + (": " + ", ".join(FAILS[:20]) if FAILS else ""), flush=True)
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
