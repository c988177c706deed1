"""Each fastvat op against the eager PyTorch composition it replaces, torch.compile of the
fastvat.reference function and a ``copy_`` of the same bytes, timed interleaved in one run, on the
CPU or a CUDA GPU.

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
The GPU shapes are ≥ 64 M elements, far beyond L2, so no cache flush is needed between calls.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import timing
from report import check, row
from timing import paired_ratio as ratio

# "full" on the CPU is the shapes the bars are stated for.
SIZES = {
    "cpu": {
        "smoke": {"perturb": (4096, 128), "l2": (4, 32, 64), "kl": (64, 2000), "gather": ((2000, 64), (4, 32))},
        "default": {"perturb": (30522, 768), "l2": (32, 128, 768), "kl": (1024, 30522),
                    "gather": ((30522, 768), (32, 128))},
        "full": {"perturb": (30522, 768), "l2": (32, 128, 768), "kl": (4096, 30522),
                 "gather": ((30522, 768), (32, 128)),
                 # one very long row: the CPU kernel's column-span split
                 "kl_long": (1, 1_000_000)},
    },
    "cuda": {
        "smoke": {"perturb": (500, 64), "l2": (4, 16, 64), "kl": (16, 500), "kl_long": (2, 2048),
                  "gather": ((1000, 64), (8, 32)), "gather_padding": 0},
        "default": {"perturb": (250000, 1024), "l2": (256, 512, 1024), "kl": (4096, 32000), "kl_long": (512, 131072),
                    "gather": ((250000, 1024), (64, 512)), "gather_padding": 0},
    },
}
SIZES["cuda"]["full"] = SIZES["cuda"]["default"]
CASES = ("perturb", "l2", "kl", "kl_long", "gather", "gather_fwd")

# The bars each fused op must meet (CPU, float32, at the "full" shapes).
BARS = {
    "perturb_": {"speedup": 2.5, "pct_copy": 80.0},
    "l2_normalize sample masked": {"speedup": 1.3},
    "kl_div fwd+bwd": {"speedup": 2.0, "mem_ratio": 0.5},
}


class Ctx:
    """Run settings shared by every case."""

    def __init__(self, device="cpu", mode="default", quick=False, compile=True, compile_cap_s=90.0,
                 dtypes=("float32", "bfloat16"), progress=None, seed=0, compile_deadline=None):
        self.device = torch.device(device)
        self.mode = mode
        self.sizes = SIZES[self.device.type][mode]
        self.compile = compile
        self.compile_cap_s = compile_cap_s
        self.compile_deadline = compile_deadline  # time.perf_counter() after which nothing compiles
        self.dtypes = [getattr(torch, d) if isinstance(d, str) else d for d in dtypes]
        self.compile_dtypes = tuple(self.dtypes)
        self.half_cases = None  # cases run for bfloat16/float16 (None: all)
        self.progress = progress
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        # seconds of timing per variant, spread over `rounds` interleaved rounds
        if mode == "smoke":
            self.min_run_time, self.rounds = 0.02, 1
        elif quick:
            self.min_run_time, self.rounds = 0.3, 2
        elif mode == "full":
            self.min_run_time, self.rounds = 2.0, 4
        else:
            self.min_run_time, self.rounds = 0.6, 3

    def randn(self, *shape, dtype=torch.float32):
        return torch.randn(*shape, generator=self.gen, device=self.device).to(dtype)

    def randint(self, low, high, shape):
        return torch.randint(low, high, shape, generator=self.gen, device=self.device)

    def tick(self, label):
        if self.progress is not None:
            self.progress(label)


def _dtname(dt):
    return str(dt).replace("torch.", "")


def _shape(*dims):
    return "x".join(str(d) for d in dims)


def _compile(ctx, dtype, fn, warm):
    """(compiled or None, note) for the torch.compile column."""
    if fn is None:
        return None, None
    if not ctx.compile:
        return None, "skipped"
    if dtype not in ctx.compile_dtypes:
        return None, "skipped (float32 only in this mode; --full)"
    if ctx.compile_deadline is not None and time.perf_counter() > ctx.compile_deadline:
        return None, "skipped (--budget spent)"
    return timing.try_compile(fn, warm, cap_s=ctx.compile_cap_s)


def _compare(ctx, *, case, shape, dtype, baseline_name, baseline, fastvat_fn, compiled_fn=None,
             compiled_warm=None, nbytes=None, bar=None, note=None, extras=None):
    """Baseline, fastvat, torch.compile of the reference, any ``extras`` (more fastvat variants)
    and a same-byte ``copy_``, timed interleaved; one row per fastvat variant, and the compiled
    function (or None)."""
    fns = {"baseline": baseline, "fastvat": fastvat_fn}
    compiled, compiled_note = _compile(ctx, dtype, compiled_fn, compiled_warm)
    if compiled is not None:
        fns["compiled"] = lambda: compiled_warm(compiled)
    fns.update(extras or {})
    if nbytes:
        n = max(int(nbytes) // 8, 1)  # float32 src and dst: reads + writes = nbytes
        # src written so the copy reads real pages; dst is touched by the warm-up call
        src, dst = torch.full((n,), 1.5, device=ctx.device), torch.empty(n, device=ctx.device)
        fns["copy"] = lambda: dst.copy_(src)
    st = timing.measure_many(fns, device=ctx.device, min_run_time=ctx.min_run_time, rounds=ctx.rounds)
    b = st["baseline"]
    common = dict(suite="ops", shape=shape, dtype=_dtname(dtype), device=ctx.device.type, baseline=baseline_name,
                  baseline_ms=b.ms, baseline_iqr_ms=b.iqr_ms, **st.load)

    def variant_row(name, label, **kw):
        f = st[name]
        r = row(case=label, fastvat_ms=f.ms, fastvat_iqr_ms=f.iqr_ms, speedup=ratio(b, f), **common, **kw)
        if nbytes:
            gbps, copy_gbps = nbytes / f.median / 1e9, 8 * n / st["copy"].median / 1e9
            r.update(gbps=gbps, copy_gbps=copy_gbps, pct_copy=100.0 * gbps / copy_gbps)
        return r

    r = variant_row("fastvat", case, note=note, compiled_note=compiled_note)
    if "compiled" in st:
        r["compiled_ms"] = st["compiled"].ms
        r["speedup_vs_compiled"] = ratio(st["compiled"], st["fastvat"])
    if bar and ctx.mode != "smoke":  # the bars are stated for the full shapes
        r["bar"] = bar
    return [r] + [variant_row(name, f"{case} [{name}]") for name in extras or {}], compiled


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

    bars = BARS["perturb_"]
    rows, _ = _compare(ctx, case="perturb_ (reuse previous)", shape=_shape(V, H), dtype=dtype,
                       baseline_name="eager norm+add_+sub_", baseline=eager, fastvat_fn=fast,
                       compiled_fn=comp_src, compiled_warm=lambda c: c(w, d, prev_c), nbytes=6 * V * H * w.element_size(),
                       bar=(f">={bars['speedup']}x & >={bars['pct_copy']:.0f}% copy" if dtype == torch.float32 else None))
    r = rows[0]
    if r["bar"]:
        r["bar_met"] = r["speedup"] >= bars["speedup"] and r["pct_copy"] >= bars["pct_copy"]
    return rows


def case_l2(ctx, dtype, norm):
    from fastvat import ops
    from fastvat import reference as ref

    B, T, H = ctx.sizes["l2"]
    x = ctx.randn(B, T, H, dtype=dtype)
    lengths = ctx.randint(T // 2, T + 1, (B,))
    m = torch.arange(T, device=ctx.device)[None, :] < lengths[:, None]
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

    passes = 3 if norm == "global" else 2
    nbytes = passes * x.numel() * x.element_size() + m.numel() * m.element_size()
    is_bar = norm == "sample" and dtype == torch.float32
    need = BARS["l2_normalize sample masked"]["speedup"]
    rows, _ = _compare(ctx, case=f"l2_normalize {norm} masked", shape=_shape(B, T, H), dtype=dtype,
                       baseline_name=base_name, baseline=eager, fastvat_fn=fast, compiled_fn=comp_src,
                       compiled_warm=lambda c: c(x, m), nbytes=nbytes, bar=f">={need}x" if is_bar else None)
    if rows[0]["bar"]:
        rows[0]["bar_met"] = rows[0]["speedup"] >= need
    return rows


def _kl_variants(p, q):
    """The CUDA kernel without the autograd wrapper, and each of its kernel choices (through the
    benchmark-only op _kl_div_with_logits_variant)."""
    def op():
        return torch.ops.fastvat.kl_div_with_logits(p, q.detach(), None, True)

    if not hasattr(torch.ops.fastvat, "_kl_div_with_logits_variant"):
        raise RuntimeError("the KL kernel variants need the benchmark-only ops: rebuild fastvat with "
                           "FASTVAT_BENCH_OPS=1 (scripts/install.sh does)")

    def variant_op(variant):
        return lambda: torch.ops.fastvat._kl_div_with_logits_variant(p, q.detach(), None, True, variant)

    out = {"op (loss+grad)": op}
    for variant in ("cached", "stream", "stream512"):
        out[f"op {variant}"] = variant_op(variant)
    return out


def case_kl(ctx, dtype, key="kl"):
    import fastvat
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

    extras = None
    if ctx.device.type == "cuda" and fastvat.extension_info()["cuda_kernels"]:
        extras = _kl_variants(p, q)
    bars = BARS["kl_div fwd+bwd"]
    is_bar = dtype == torch.float32 and key == "kl"
    rows, compiled = _compare(ctx, case="kl_div_with_logits fwd+bwd", shape=_shape(B, V), dtype=dtype,
                              baseline_name="eager log_softmax+kl_div+bwd", baseline=eager, fastvat_fn=fast,
                              compiled_fn=comp_src, compiled_warm=comp_warm, nbytes=3 * B * V * p.element_size(),
                              bar=(f">={bars['speedup']}x & peak<={bars['mem_ratio']}x eager" if is_bar else None),
                              extras=extras)
    r = rows[0]
    # after the timing runs, so that nothing is allocated for the first time
    mb = 1024.0 ** 2
    peaks = {"baseline": eager, "fastvat": fast}
    if compiled is not None:
        peaks["compiled"] = lambda: comp_warm(compiled)
    for name, fn in peaks.items():
        q.grad = None
        peaks[name] = timing.peak_extra_bytes(fn, device=ctx.device)
        if peaks[name] is not None:
            r[f"{name}_peak_mb"] = peaks[name] / mb
    q.grad = None
    if r["bar"]:
        eb, fb = peaks["baseline"], peaks["fastvat"]
        mem_ok = eb is not None and fb is not None and fb <= bars["mem_ratio"] * eb
        r["bar_met"] = r["speedup"] >= bars["speedup"] and mem_ok
        if (B, V) != SIZES["cpu"]["full"]["kl"]:
            r["note"] = "bar stated for 4096x30522 (--full)"
    return rows


def _gather_inputs(ctx, dtype):
    (V, H), (B, T) = ctx.sizes["gather"]
    pad = ctx.sizes.get("gather_padding")
    w = ctx.randn(V, H, dtype=dtype).requires_grad_(True)
    if pad is None:
        ids = ctx.randint(0, V, (B, T))
    else:
        # Zipf-like ids and padded sequence ends: long and short runs of one row, which is what the
        # GPU backward's cost depends on
        ids = (torch.rand(B, T, generator=ctx.gen, device=ctx.device).pow(3.0) * (V - 1)).long() + 1
        lengths = ctx.randint(T // 2, T + 1, (B,))
        ids = torch.where(torch.arange(T, device=ctx.device)[None, :] < lengths[:, None], ids, pad)
    rows, inv = torch.unique(ids, sorted=True, return_inverse=True)
    delta = ctx.randn(rows.numel(), H, dtype=dtype).requires_grad_(True)
    return w, ids, delta, inv, pad


def case_gather(ctx, dtype):
    from fastvat import ops
    from fastvat import reference as ref

    w, ids, delta, inv, pad = _gather_inputs(ctx, dtype)
    g = ctx.randn(*ids.shape, w.shape[1], dtype=dtype)

    def eager():
        w.grad = delta.grad = None
        (F.embedding(ids, w, padding_idx=pad) + delta[inv]).backward(g)

    def fast():
        w.grad = delta.grad = None
        ops.embedding_gather_add(w, ids, delta, inv, padding_idx=pad).backward(g)

    def comp_src(w_, ids_, d_, inv_):
        return ref.embedding_gather_add(w_, ids_, d_, inv_, -1 if pad is None else pad)

    def comp_warm(c):
        w.grad = delta.grad = None
        c(w, ids, delta, inv).backward(g)

    (V, H), s = w.shape, w.element_size()
    T, U = ids.numel(), delta.shape[0]
    nbytes = (4 * T * H + V * H + U * H) * s + 2 * ids.numel() * ids.element_size()
    rows, _ = _compare(ctx, case="embedding_gather_add fwd+bwd", shape=f"{_shape(V, H)} ids {_shape(*ids.shape)}",
                       dtype=dtype, baseline_name="eager F.embedding + delta[idx] + bwd", baseline=eager,
                       fastvat_fn=fast, compiled_fn=comp_src, compiled_warm=comp_warm, nbytes=nbytes)
    return rows


def case_gather_fwd(ctx, dtype):
    from fastvat import ops

    w, ids, delta, inv, pad = _gather_inputs(ctx, dtype)
    H = w.shape[1]
    with torch.no_grad():
        rows, _ = _compare(ctx, case="embedding_gather_add fwd", shape=f"{_shape(*w.shape)} ids {_shape(*ids.shape)}",
                           dtype=dtype, baseline_name="eager F.embedding + delta[idx]",
                           baseline=lambda: F.embedding(ids, w, padding_idx=pad) + delta[inv],
                           fastvat_fn=lambda: ops.embedding_gather_add(w, ids, delta, inv, padding_idx=pad),
                           nbytes=3 * ids.numel() * H * w.element_size())
    return rows


def _plan(ctx, cases):
    plan = []
    for dt in ctx.dtypes:
        wanted = cases if dt == torch.float32 or ctx.half_cases is None else [c for c in cases if c in ctx.half_cases]
        name = _dtname(dt)
        if "perturb" in wanted:
            plan.append((f"perturb_ {name}", lambda dt=dt: case_perturb(ctx, dt)))
        if "l2" in wanted:
            for norm in ("sample", "token", "global"):
                plan.append((f"l2_normalize {norm} {name}", lambda dt=dt, n=norm: case_l2(ctx, dt, n)))
        if "kl" in wanted:
            plan.append((f"kl_div fwd+bwd {name}", lambda dt=dt: case_kl(ctx, dt)))
        # the long CPU row is about the column-span split, which is the same in every dtype
        if "kl_long" in wanted and "kl_long" in ctx.sizes and (dt == torch.float32 or ctx.device.type == "cuda"):
            plan.append((f"kl_div fwd+bwd long rows {name}", lambda dt=dt: case_kl(ctx, dt, "kl_long")))
        if "gather" in wanted:
            plan.append((f"gather_add fwd+bwd {name}", lambda dt=dt: case_gather(ctx, dt)))
        if "gather_fwd" in wanted and ctx.device.type == "cuda":
            plan.append((f"gather_add fwd {name}", lambda dt=dt: case_gather_fwd(ctx, dt)))
    return plan


def run(ctx, cases=CASES, on_rows=None):
    """All op cases for the dtypes of ``ctx``; returns rows (a case's error becomes its note).
    ``on_rows(rows)`` is called after every case, with the rows so far."""
    rows = []
    for label, fn in _plan(ctx, cases):
        ctx.tick(label)
        try:
            rows.extend(fn())
        except Exception as exc:  # noqa: BLE001 - one broken case must not lose the others
            rows.append(row(suite="ops", case=label, device=ctx.device.type, note=f"error: {timing.first_line(exc)}"))
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        if on_rows is not None:
            on_rows(rows)
    return rows


def plan_size(ctx, cases=CASES):
    return len(_plan(ctx, cases))


def summary_checks(rows):
    """The bars, as 'check' rows (for the rows that carry one)."""
    return [check(f"{r['case']} {r['dtype']} speedup", r["speedup"], r["bar"], r.get("bar_met"), r.get("note"),
                  busy=r.get("busy"))
            for r in rows if r.get("bar") and r["suite"] == "ops"]
