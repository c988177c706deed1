"""Drift of the article's in-place perturb/restore cycle, and the exact restore that removes it.

One cycle is what the article's training step does to the embedding matrix W:
``delta = fastvat.ops.perturb_(W, d, scale=eps)`` (W += eps*d/||d||), the adversarial pass, then
``fastvat.ops.restore_(W, delta)`` (W -= delta). In floating point (W + r) - r != W, so W drifts.
``fastvat.inplace.ExactPerturbation`` restores from a saved copy instead (bit-exact).

Measured on a BERT-vocabulary-sized matrix (30522 x 64 by default, N(0, 0.02) init, like BERT's
initializer_range), fp32 and bf16, eps = 1 (the article's) and 10, over 1,000 cycles; every cycle
gets a different N(0, 1) direction (one of a pool of 8, rolled by a random number of rows, so the
rounding errors of successive cycles are not correlated — as in training — and the RNG stays out
of the timing).

    python benchmarks/drift_perturb_restore.py [--cycles 1000] [--rows 30522] [--dim 64]

Writes benchmarks/results/drift.json and prints a table. Columns:
  changed   fraction of entries of W that differ from the initial W (bitwise)
  max_abs   max |W - W0|
  rel_rms   ||W - W0|| / ||W0||  (0.05 means the drift is 5% of the weights' own size)
  max_ulp   max |W - W0| in units in the last place of a typical weight (0.02) in W's dtype
            (2^-29 in fp32, 2^-13 in bf16)
  ms/cycle  wall time of one perturb + restore (no model in between)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastvat  # noqa: E402
from fastvat import ops  # noqa: E402
from fastvat.inplace import ExactPerturbation  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """Float bits mapped to integers that are ordered like the floats (so differences count ULPs)."""
    if t.dtype == torch.float32:
        b, mask = t.view(torch.int32).to(torch.int64), 0x7FFFFFFF
    elif t.dtype in (torch.bfloat16, torch.float16):
        b, mask = t.view(torch.int16).to(torch.int64), 0x7FFF
    elif t.dtype == torch.float64:
        b, mask = t.view(torch.int64), 0x7FFFFFFFFFFFFFFF
    else:
        raise TypeError(t.dtype)
    return torch.where(b < 0, -(b & mask), b)


def _ulp(value: float, dtype: torch.dtype) -> float:
    """The spacing of floats of `dtype` at `value`."""
    v = torch.tensor(value, dtype=dtype)
    return float(torch.nextafter(v, torch.tensor(float("inf"), dtype=dtype)).double() - v.double())


def drift_stats(w: torch.Tensor, w0: torch.Tensor, sigma: float) -> dict:
    diff = w.double() - w0.double()
    max_abs = float(diff.abs().max())
    return {
        "changed": float((_ordered_bits(w) != _ordered_bits(w0)).double().mean()),
        "max_abs": max_abs,
        "rel_rms": float(diff.norm() / w0.double().norm()),
        "max_ulp": max_abs / _ulp(sigma, w.dtype),
    }


def run(method, dtype, scale, cycles, rows, dim, checkpoints, seed=0, sigma=0.02):
    g = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(rows, dim, generator=g) * sigma).to(dtype)
    dirs = [torch.randn(rows, dim, generator=g).to(dtype) for _ in range(8)]
    w = w0.clone()
    buf = torch.empty_like(w)
    exact = ExactPerturbation(w)
    trajectory = []
    elapsed = 0.0
    with torch.no_grad():
        for i in range(1, cycles + 1):
            d = dirs[i % len(dirs)].roll(int(torch.randint(rows, (), generator=g)), dims=0)
            t0 = time.perf_counter()
            if method == "perturb_/restore_":
                ops.perturb_(w, d, scale=scale, out=buf)
                ops.restore_(w, buf)
            else:
                exact.apply(d, scale=scale)
                exact.restore()
            elapsed += time.perf_counter() - t0
            if i in checkpoints:
                trajectory.append({"cycle": i, **drift_stats(w, w0, sigma)})
    final = trajectory[-1]
    return {
        "method": method,
        "dtype": str(dtype).replace("torch.", ""),
        "scale": scale,
        "cycles": cycles,
        "shape": [rows, dim],
        "ms_per_cycle": 1e3 * elapsed / cycles,
        "bit_identical": final["changed"] == 0.0,
        **{k: final[k] for k in ("changed", "max_abs", "rel_rms", "max_ulp")},
        "trajectory": trajectory,
        "extra_memory_bytes": exact.nbytes if method != "perturb_/restore_" else buf.numel() * buf.element_size(),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=30522)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 10.0])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "drift.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    checkpoints = {c for c in (1, 10, 100, args.cycles) if c <= args.cycles}
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for scale in args.scales:
            for method in ("perturb_/restore_", "ExactPerturbation"):
                rows.append(run(method, dtype, scale, args.cycles, args.rows, args.dim, checkpoints))
                r = rows[-1]
                print(f"{r['method']:18s} {r['dtype']:9s} scale={r['scale']:<5g} changed={r['changed']:.4f} "
                      f"max_abs={r['max_abs']:.3e} rel_rms={r['rel_rms']:.3e} max_ulp={r['max_ulp']:.1f} "
                      f"{r['ms_per_cycle']:.2f} ms/cycle", flush=True)
    out = {
        "benchmark": "drift of in-place perturb/restore cycles",
        "init": "N(0, 0.02)",
        "directions": "N(0, 1), pool of 8, each use rolled by a random number of rows",
        "backend": fastvat.extension_info()["backend"],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "results": rows,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print()
    print("| method | dtype | eps | cycles | entries changed | max abs drift | rel. RMS drift | max drift in ULP(0.02) "
          "| ms/cycle |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['dtype']} | {r['scale']:g} | {r['cycles']} | {100 * r['changed']:.2f}% | "
              f"{r['max_abs']:.2e} | {r['rel_rms']:.2e} | {r['max_ulp']:.1f} | {r['ms_per_cycle']:.2f} |")
    print()
    print("drift after 1 / 10 / 100 / N cycles (rel. RMS):")
    for r in rows:
        traj = " / ".join(f"{t['rel_rms']:.2e}" for t in r["trajectory"])
        print(f"  {r['method']:18s} {r['dtype']:9s} eps={r['scale']:<4g} {traj}")
    print(f"\nwrote {args.out}")
    return out


if __name__ == "__main__":
    main()
