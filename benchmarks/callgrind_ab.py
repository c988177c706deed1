"""Instruction-count A/B of the compiled CPU kernels of two source trees, under valgrind's callgrind.

    python benchmarks/callgrind_ab.py --old-tree /tmp/fv_old --out benchmarks/results/cpu_callgrind_ab

Each tree must hold a built extension (fastvat/_C*.so, e.g. from
``FASTVAT_CUDA=0 python setup.py build_ext --inplace`` in that tree); --new-tree defaults to this
checkout. A worktree of an older commit makes the OLD side: ``git worktree add /tmp/fv_old <commit>``.

Why instructions and not time: on a small, shared machine wall-clock times move with the load of
other processes, while callgrind's instruction count (Ir) of a deterministic kernel is the same on
every run. Ir is not time (it ignores memory stalls, vector width and frequency), so it answers "does
the new code execute more work on normal data", not "is it slower by x %" -- a regression smaller
than the run-to-run spread of a timing can still be seen here.

How the count is isolated:
  * The worker loads only the tree's _C*.so with torch.ops.load_library and calls torch.ops.fastvat.*
    itself, so neither tree's Python wrappers (which differ between commits) run.
  * Collection is toggled on entry to / off on exit from the op's registered CPU entry point
    (e.g. ``fastvat::cpu::(anonymous namespace)::kl_div_with_logits_cpu(...)``): argument checks,
    output allocation and the kernel are counted, dispatcher and Python are not. Only the outermost
    function may match the pattern, because callgrind toggles on every entry of a matching function
    and a matching callee would switch collection off again; the patterns end in ")" so that the
    entry point's lambdas ("...::operator()() const") and its ".cold" clone do not match.
  * --dump-after writes one profile per call. The first call is a warm-up (one-time static
    initialisation, allocator growth) and is not reported; the reported Ir/call is the median of
    the remaining --calls profiles, which differ from each other only by a few hundred instructions
    (allocator paths).
  * One thread (OMP_NUM_THREADS=1, torch.set_num_threads(1)): valgrind serialises threads anyway, and
    idle OpenMP workers would add spin-wait instructions that depend on scheduling.
  * Inputs come from a fixed seed and are drawn before the first call.

Outputs in --out: results.json (per case: Ir per call for OLD and NEW, NEW/OLD, and which extension
files were measured), results.md (the same as a table), annotate/<side>_<case>.txt (callgrind_annotate
of the last call: exclusive Ir by function with the hot source lines, then inclusive by function), for
finding where a difference comes from, and raw/ (every per-call profile and valgrind's log; large, and
listed in the folder's .gitignore).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import glob
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# The registered CPU entry point of each op (see the TORCH_LIBRARY_IMPL lines in csrc/cpu/*.cpp).
ENTRY = {
    "kl_div_with_logits": "fastvat::cpu::(anonymous namespace)::kl_div_with_logits_cpu(",
    "l2_normalize": "fastvat::cpu::(anonymous namespace)::l2_normalize_cpu(",
    "perturb_": "fastvat::cpu::(anonymous namespace)::perturb_cpu(",
}
# Two spellings of the same full match, one per option: callgrind keeps its patterns in a trie, and a
# second option with an identical wildcard pattern lands on a literal "*" node that never matches
# (valgrind 3.19), so --dump-after would silently do nothing. Both end in ")": the entry point's
# lambdas ("...::operator()() const") and its "[clone .cold]" must not match.
TOGGLE_SUFFIX = "*)"
DUMP_SUFFIX = "at::Tensor*)"

# case -> (op, description). Shapes are the ones of the CPU op benchmarks: a BERT-sized vocabulary
# head, a few 128k-class rows (the span-split KL path), and [B, T, H] embedding perturbations.
CASES = {
    "kl": ("kl_div_with_logits", "fp32 [256, 30522] randn logits, mask None, compute_grad"),
    "kl_long": ("kl_div_with_logits", "fp32 [2, 131072] randn logits (column-span split), compute_grad"),
    # nearby distributions (VAT's power step, R3F): rows whose KL is small take the exact-difference pass
    "kl_near": ("kl_div_with_logits", "fp32 [64, 30522] randn logits, q = p + 1e-5 randn, compute_grad"),
    "l2_sample_masked": ("l2_normalize", "fp32 x [32, 128, 768], float mask [32, 128] (~20% zeros), 'sample'"),
    "l2_global": ("l2_normalize", "fp32 x [4096, 768], no mask, 'global'"),
    "l2_token": ("l2_normalize", "fp32 x [32, 128, 768], no mask, 'token'"),
    # masked-out tokens are all-zero groups: the one place where "normal data" meets the robust norm's
    # special case (a zero sum of squares) on every call
    "l2_token_masked": ("l2_normalize", "fp32 x [32, 128, 768], float mask [32, 128] (~20% zeros), 'token'"),
    "perturb_fp32": ("perturb_", "fp32 weight/direction/delta [8192, 768], has_previous"),
    "perturb_bf16": ("perturb_", "bf16 weight/direction/delta [8192, 768], has_previous"),
}


# ---------------------------------------------------------------------------------------------- worker


def _make_call(case: str):
    import torch

    torch.manual_seed(0)
    ops = torch.ops.fastvat
    if case in ("kl", "kl_long"):
        shape = (256, 30522) if case == "kl" else (2, 131072)
        p, q = torch.randn(shape), torch.randn(shape)
        return lambda: ops.kl_div_with_logits(p, q, None, True)
    if case == "kl_near":
        p = torch.randn(64, 30522)
        q = p + 1e-5 * torch.randn(64, 30522)
        return lambda: ops.kl_div_with_logits(p, q, None, True)
    if case == "l2_sample_masked":
        x = torch.randn(32, 128, 768)
        mask = (torch.rand(32, 128) >= 0.2).float()
        return lambda: ops.l2_normalize(x, None, mask, 1.0, "sample")
    if case == "l2_token_masked":
        x = torch.randn(32, 128, 768)
        mask = (torch.rand(32, 128) >= 0.2).float()
        return lambda: ops.l2_normalize(x, None, mask, 1.0, "token")
    if case == "l2_global":
        x = torch.randn(4096, 768)
        return lambda: ops.l2_normalize(x, None, None, 1.0, "global")
    if case == "l2_token":
        x = torch.randn(32, 128, 768)
        return lambda: ops.l2_normalize(x, None, None, 1.0, "token")
    if case in ("perturb_fp32", "perturb_bf16"):
        dtype = torch.float32 if case == "perturb_fp32" else torch.bfloat16
        w = torch.randn(8192, 768).to(dtype)
        d = torch.randn(8192, 768).to(dtype)
        # a previous perturbation of the size perturb_ itself leaves (scale 1 over the whole tensor)
        delta = (torch.randn(8192, 768) / 2508.0).to(dtype)
        return lambda: ops.perturb_(w, d, delta, 1.0, True)
    raise ValueError(f"unknown case {case!r}")


def worker(tree: str, case: str, calls: int) -> None:
    import torch

    torch.set_num_threads(1)
    libs = sorted(glob.glob(os.path.join(tree, "fastvat", "_C*.so")))
    if len(libs) != 1:
        raise SystemExit(f"expected one fastvat/_C*.so in {tree}, found {libs}")
    torch.ops.load_library(libs[0])
    call = _make_call(case)
    for _ in range(1 + calls):  # the first is the warm-up; --dump-after splits the profile per call
        call()
    print(f"worker done: {libs[0]} {case} {1 + calls} calls", flush=True)


# ----------------------------------------------------------------------------------------- orchestrator


def _total_ir(path: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(("totals:", "summary:")):
                return int(line.split()[1])
    raise ValueError(f"no totals line in {path}")


def _dump_index(path: str) -> int:
    # callgrind names the dumps <out>.1, <out>.2, ... in the order they were written
    return int(path.rsplit(".", 1)[1])


def _annotate(profile: str, inclusive: bool) -> str:
    # A --dump-after profile ends with the call chain that was active at the dump, written as
    # "calls=0" records; callgrind_annotate (3.19) then books the chain's inclusive cost as
    # __libc_start_main's own. The number of calls is only displayed, so a copy with 1 reads right.
    fixed = profile + ".annotate-input"
    with open(profile) as src, open(fixed, "w") as dst:
        for line in src:
            dst.write("calls=1 " + line[len("calls=0 "):] if line.startswith("calls=0 ") else line)
    args = ["callgrind_annotate", "--threshold=99", f"--auto={'no' if inclusive else 'yes'}"]
    if inclusive:
        args.append("--inclusive=yes")
    try:
        return subprocess.run(args + [fixed], check=True, capture_output=True, text=True).stdout
    finally:
        os.remove(fixed)


def run_one(python: str, tree: str, side: str, case: str, calls: int, out: str) -> dict:
    op = CASES[case][0]
    base = os.path.join(out, "raw", f"{side}_{case}.callgrind")
    for stale in glob.glob(base + "*"):
        os.remove(stale)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("FASTVAT_CPU_SIMD", None)  # "0" would measure the ATen fallback, not the kernels
    cmd = [
        "valgrind", "--tool=callgrind", "--collect-atstart=no",
        f"--toggle-collect={ENTRY[op]}{TOGGLE_SUFFIX}", f"--dump-after={ENTRY[op]}{DUMP_SUFFIX}",
        # each per-call dump must name its own files and functions, or callgrind_annotate cannot read it alone
        "--compress-strings=no", "--compress-pos=no",
        f"--callgrind-out-file={base}",
        python, os.path.abspath(__file__), "--worker", case, "--tree", tree, "--calls", str(calls),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    with open(base + ".log", "w") as f:
        f.write(" ".join(cmd) + "\n\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0 or "worker done" not in proc.stdout:
        raise RuntimeError(f"{side} {case}: valgrind run failed, see {base}.log")
    dumps = sorted(glob.glob(base + ".[0-9]*"), key=_dump_index)
    if len(dumps) != 1 + calls:
        raise RuntimeError(f"{side} {case}: expected {1 + calls} per-call dumps, got {len(dumps)} "
                           f"(does the entry-point pattern match exactly one function?)")
    per_call = [_total_ir(p) for p in dumps[1:]]
    last = dumps[-1]
    with open(os.path.join(out, "annotate", f"{side}_{case}.txt"), "w") as f:
        f.write(f"# {side} {case}: last of {calls} timed calls ({os.path.basename(last)})\n\n")
        f.write("## exclusive\n" + _annotate(last, False) + "\n## inclusive\n" + _annotate(last, True))
    return {"warmup_ir": _total_ir(dumps[0]), "per_call_ir": per_call, "ir_per_call": int(statistics.median(per_call))}


def orchestrate(args) -> None:
    if shutil.which("valgrind") is None or shutil.which("callgrind_annotate") is None:
        raise SystemExit("valgrind (with callgrind_annotate) is needed")
    trees = {"old": os.path.abspath(args.old_tree), "new": os.path.abspath(args.new_tree)}
    out = os.path.abspath(args.out)
    for sub in ("raw", "annotate"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    with open(os.path.join(out, ".gitignore"), "w") as f:
        f.write("raw/\n")
    cases = args.cases or list(CASES)
    jobs = [(side, case) for case in cases for side in ("old", "new")]
    results: dict = {case: {} for case in cases}
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_one, sys.executable, trees[side], side, case, args.calls, out): (side, case)
                   for side, case in jobs}
        for fut in concurrent.futures.as_completed(futures):
            side, case = futures[fut]
            results[case][side] = fut.result()
            print(f"{side:3s} {case:18s} {results[case][side]['ir_per_call']:>14,d} Ir/call", flush=True)

    def commit_of(tree: str) -> str | None:
        r = subprocess.run(["git", "-C", tree, "rev-parse", "HEAD"], capture_output=True, text=True)
        return r.stdout.strip() or None

    def dirty(tree: str) -> list:
        r = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--", "csrc"], capture_output=True, text=True)
        return r.stdout.splitlines()

    def extension(tree: str) -> dict:
        # the .so is what was measured; a source edited after it was built would not be in the numbers
        so = sorted(glob.glob(os.path.join(tree, "fastvat", "_C*.so")))[0]
        built = os.path.getmtime(so)
        sources = glob.glob(os.path.join(tree, "csrc", "**", "*.*"), recursive=True)
        return {"so": so, "built": datetime.datetime.fromtimestamp(built).isoformat(timespec="seconds"),
                "sources_newer_than_so": sorted(os.path.relpath(p, tree) for p in sources
                                                if os.path.getmtime(p) > built and p.endswith((".cpp", ".h")))}

    import torch

    doc = {
        "what": "callgrind instruction counts (Ir) per call of the fastvat CPU ops' registered entry points, "
                "OLD tree vs NEW tree, one thread; median of the timed calls after one warm-up call",
        "command": " ".join([os.path.relpath(sys.argv[0], REPO) if sys.argv[0].startswith(REPO) else sys.argv[0]]
                            + sys.argv[1:]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "trees": {side: {"path": t, "commit": commit_of(t), "csrc_changes_not_committed": dirty(t),
                         "extension": extension(t)}
                  for side, t in trees.items()},
        "calls": args.calls,
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "torch": torch.__version__,
                    "valgrind": subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip()},
        "callgrind_patterns": {op: {"toggle_collect": e + TOGGLE_SUFFIX, "dump_after": e + DUMP_SUFFIX}
                               for op, e in ENTRY.items()},
        "cases": {},
    }
    for case in cases:
        o, n = results[case]["old"], results[case]["new"]
        doc["cases"][case] = {
            "op": CASES[case][0], "inputs": CASES[case][1],
            "old_ir_per_call": o["ir_per_call"], "new_ir_per_call": n["ir_per_call"],
            "new_over_old": round(n["ir_per_call"] / o["ir_per_call"], 5),
            "old_per_call_ir": o["per_call_ir"], "new_per_call_ir": n["per_call_ir"],
            "old_warmup_ir": o["warmup_ir"], "new_warmup_ir": n["warmup_ir"],
        }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    lines = ["| case | inputs | old Ir/call | new Ir/call | new/old |", "|---|---|---:|---:|---:|"]
    for case, r in doc["cases"].items():
        lines.append(f"| {case} | {r['inputs']} | {r['old_ir_per_call']:,} | {r['new_ir_per_call']:,} | "
                     f"{r['new_over_old']:.4f} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"OLD {doc['trees']['old']['commit']} vs NEW {doc['trees']['new']['commit']}, "
                f"{args.calls} calls after one warm-up, one thread, callgrind Ir\n\n" + table)
    print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old-tree", help="source tree with a built fastvat/_C*.so (the baseline)")
    ap.add_argument("--new-tree", default=REPO, help="tree compared against the baseline (default: this checkout)")
    ap.add_argument("--out", help="output folder")
    ap.add_argument("--calls", type=int, default=3, help="profiled calls per case after the warm-up")
    ap.add_argument("--cases", nargs="*", choices=list(CASES), help="default: all")
    ap.add_argument("--jobs", type=int, default=2, help="valgrind runs at once")
    ap.add_argument("--worker", choices=list(CASES), help=argparse.SUPPRESS)
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.tree, args.worker, args.calls)
        return
    if not args.old_tree or not args.out:
        ap.error("--old-tree and --out are required")
    orchestrate(args)


if __name__ == "__main__":
    main()
