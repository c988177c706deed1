"""Shared benchmark plumbing: timing, copy bandwidth, peak memory, machine info, output files.

Timing uses ``torch.utils.benchmark.Timer`` (which synchronises the accelerator around every
measurement) with the process's thread count (its default would be one thread). Fast functions
go through ``blocked_autorange``; slow ones (a call longer than a tenth of the time budget) are
timed one call at a time, at least ``min_reps`` times. Both give a median and an IQR.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import gc
import json
import math
import os
import platform
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field

import torch
from torch.utils import benchmark as tbench


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
@dataclass
class Stat:
    """Seconds per call: median, interquartile range, and the samples behind them."""

    median: float
    iqr: float
    n: int
    times: list = field(default_factory=list)
    # median per interleaved round (measure_many), for ratios paired round by round
    round_medians: list = field(default_factory=list)

    @property
    def ms(self) -> float:
        return self.median * 1e3

    @property
    def iqr_ms(self) -> float:
        return self.iqr * 1e3


def sync(device) -> None:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _quartiles(xs):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def measure(fn, *, device="cpu", min_run_time=1.0, min_reps=3, max_reps=50, warmup=1) -> Stat:
    """Median and IQR of the run time of ``fn()`` (seconds per call)."""
    t0 = None
    for _ in range(max(warmup, 1)):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        t0 = time.perf_counter() - start
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    if t0 * 10 < min_run_time:
        m = timer.blocked_autorange(min_run_time=min_run_time)
        times = list(m.times)
        if len(times) >= 4:
            return Stat(m.median, m.iqr, len(times), times)
        q1, med, q3 = _quartiles(times)
        return Stat(med, q3 - q1, len(times), times)
    reps = int(min(max(math.ceil(min_run_time / max(t0, 1e-9)), min_reps), max_reps))
    times = [timer.timeit(1).median for _ in range(reps)]
    q1, med, q3 = _quartiles(times)
    return Stat(med, q3 - q1, len(times), times)


def measure_many(fns: dict, *, device="cpu", min_run_time=1.0, rounds=3, min_reps=3, max_reps=60,
                 warmup=1) -> dict:
    """Time several functions interleaved (A B C, B C A, C A B, ...), so that a change of machine
    load during the run hits all of them alike; returns {name: Stat} from the pooled samples.

    ``min_run_time`` is the time budget per function. Fast functions are timed in
    ``blocked_autorange`` blocks (one block per function per round); slow ones one call at a time,
    ``min_reps`` calls at least, spread over the rounds.
    """
    names = list(fns)
    first = {}
    for name in names:
        for _ in range(max(warmup, 1)):
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            first[name] = time.perf_counter() - start
    timers = {n: tbench.Timer(stmt="fn()", globals={"fn": fns[n]}, num_threads=torch.get_num_threads())
              for n in names}
    slow = {n for n in names if first[n] * 10 * rounds >= min_run_time}
    samples = {n: [] for n in names}
    per_round_medians = {n: [] for n in names}
    # slow functions: ceil(min_run_time / t) calls each (at least min_reps), spread over the rounds
    per_round = {}
    for n in slow:
        reps = int(min(max(min_reps, math.ceil(min_run_time / max(first[n], 1e-9))), max_reps))
        per_round[n] = max(1, math.ceil(reps / rounds))
    for r in range(rounds):
        # rotate the order every round, so that no function always runs right after the same one
        # (the previous call's allocations and cache state bias a call by a few per cent)
        for n in names[r % len(names):] + names[: r % len(names)]:
            if n in slow:
                got = [timers[n].timeit(1).median for _ in range(per_round[n])]
            else:
                got = list(timers[n].blocked_autorange(min_run_time=min_run_time / rounds).times)
            samples[n].extend(got)
            per_round_medians[n].append(statistics.median(got))
    out = {}
    for n in names:
        q1, med, q3 = _quartiles(samples[n])
        out[n] = Stat(med, q3 - q1, len(samples[n]), samples[n], per_round_medians[n])
    return out


def paired_ratio(a: Stat, b: Stat) -> float:
    """a / b as the median over interleaved rounds of (a's round median / b's round median): a load
    change between rounds cancels out. Falls back to the ratio of the medians without rounds."""
    if a.round_medians and len(a.round_medians) == len(b.round_medians):
        return statistics.median(x / y for x, y in zip(a.round_medians, b.round_medians))
    return a.median / b.median


class TimeLimit(Exception):
    """Raised inside ``time_limit`` when the time is up."""


@contextlib.contextmanager
def time_limit(seconds):
    """Raise ``TimeLimit`` in the block after ``seconds`` (main thread on POSIX; else no limit)."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def _handler(signum, frame):
        raise TimeLimit(f"took longer than {seconds:g} s")

    old = signal.signal(signal.SIGALRM, _handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def single_process_inductor() -> None:
    """Compile in this process: inductor's pool of compile workers would otherwise warm up in the
    background and take CPU from the measurements that follow (2 cores here)."""
    with contextlib.suppress(Exception):
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1


def try_compile(fn, warm, *, cap_s=120.0, **compile_kwargs):
    """``torch.compile(fn)`` and run ``warm(compiled)`` once under a time cap.

    Returns ``(compiled, None)`` or ``(None, reason)`` — the reason is one short line.
    """
    single_process_inductor()
    start = time.perf_counter()
    try:
        compiled = torch.compile(fn, **compile_kwargs)
        with time_limit(cap_s):
            warm(compiled)
    except TimeLimit as exc:
        _reset_dynamo()
        return None, f"compile {exc}"
    except Exception as exc:  # noqa: BLE001 - any compile failure is reported, not raised
        _reset_dynamo()
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return None, f"compile failed: {type(exc).__name__}: {msg[:120]}"
    return compiled, f"compiled in {time.perf_counter() - start:.1f} s"


def _reset_dynamo():
    with contextlib.suppress(Exception):
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# bandwidth and memory
# ---------------------------------------------------------------------------------------------
_MALLOC = {"state": None}


def stable_malloc() -> str:
    """Fix glibc's malloc thresholds at the values its dynamic heuristic tends to (mmap above
    32 MiB, trim above 64 MiB), so that the cost of an eager composition's temporaries does not
    depend on which sizes earlier cases happened to free (measured: the masked-l2 eager baseline
    ran 1.4 ms or 8 ms per call depending on history, page faults vs reused heap memory). Tensors
    above 32 MiB still come from mmap and are paid in page faults, as in any process.
    Returns a note for the machine info."""
    if _MALLOC["state"] is None:
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            ok = libc.mallopt(-3, 32 << 20) == 1 and libc.mallopt(-1, 64 << 20) == 1  # M_MMAP_ / M_TRIM_THRESHOLD
            _MALLOC["state"] = "glibc mmap_threshold=32MiB trim_threshold=64MiB" if ok else "default (mallopt failed)"
        except (OSError, AttributeError):
            _MALLOC["state"] = "default (not glibc)"
    return _MALLOC["state"]

_COPY_CACHE: dict = {}


def copy_bandwidth(nbytes: int, *, device="cpu", min_run_time=0.5) -> tuple[float, float]:
    """Same-run ``dst.copy_(src)`` moving ``nbytes`` in all (read + write): (GB/s, seconds)."""
    key = (str(device), int(nbytes))
    if key in _COPY_CACHE:
        return _COPY_CACHE[key]
    n = max(int(nbytes) // 8, 1)  # float32 elements per tensor: reads n*4 bytes, writes n*4 bytes
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    st = measure(lambda: dst.copy_(src), device=device, min_run_time=min_run_time)
    res = (8 * n / st.median / 1e9, st.median)
    _COPY_CACHE[key] = res
    return res


def _proc_status_kb(key: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_extra_bytes(fn, *, device="cpu"):
    """Peak memory above the level before the call, during one call of ``fn()``; None if unknown.

    CUDA: ``torch.cuda.max_memory_allocated`` after a peak reset. CPU: the process's peak resident
    set (VmHWM, reset through /proc/self/clear_refs) minus its resident set before the call.
    Large tensors come from mmap and go back to the OS when freed, so this counts the pages the
    call really touched; run ``fn`` once before so one-time allocations are not counted.
    """
    gc.collect()
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - base
    if not _reset_peak_rss():
        return None
    base = _proc_status_kb("VmRSS")
    fn()
    peak = _proc_status_kb("VmHWM")
    if base is None or peak is None:
        return None
    return max(peak - base, 0) * 1024


# ---------------------------------------------------------------------------------------------
# machine info
# ---------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device="cpu") -> dict:
    import fastvat

    info = fastvat.extension_info()
    out = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "gpu": None,
        "fastvat": fastvat.__version__,
        "fastvat_backend": info["backend"],
        "fastvat_cuda_kernels": info["cuda_kernels"],
        "malloc": _MALLOC["state"] or "default",
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return out


def machine_line(m: dict) -> str:
    s = (f"{m['cpu']} | {m['torch_threads']} threads | torch {m['torch']} | CUDA {m['cuda']} | "
         f"fastvat {m['fastvat']} backend={m['fastvat_backend']}")
    if m.get("gpu"):
        s += f" | GPU {m['gpu']}"
    if m.get("load_average_1m") is not None:
        s += f" | load {m['load_average_1m']}"
    return s


# ---------------------------------------------------------------------------------------------
# rows, table and files
# ---------------------------------------------------------------------------------------------
COLUMNS = [
    "suite", "case", "shape", "dtype", "device",
    "baseline", "baseline_ms", "baseline_iqr_ms",
    "fastvat_ms", "fastvat_iqr_ms", "speedup",
    "compiled_ms", "speedup_vs_compiled", "compiled_note",
    "gbps", "copy_gbps", "pct_copy",
    "bound_ms", "pct_of_bound",
    "baseline_peak_mb", "fastvat_peak_mb", "compiled_peak_mb",
    "value", "bar", "bar_met", "note",
]


def row(**kw) -> dict:
    r = {c: None for c in COLUMNS}
    unknown = set(kw) - set(COLUMNS)
    if unknown:
        raise KeyError(f"unknown row fields {sorted(unknown)}")
    r.update(kw)
    return r


def _f(x, fmt="{:.2f}"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return fmt.format(x)


def format_table(rows) -> str:
    head = ["case", "shape", "dtype", "dev", "baseline", "base ms", "fastvat ms", "speedup",
            "compile ms", "GB/s", "%copy|%bound", "bar"]
    lines = []
    for r in rows:
        if r["suite"] == "check":
            lines.append([r["case"], "", "", "", "", "", "", _f(r["value"], "{:.3f}"), "", "", "",
                          _bar_text(r)])
            continue
        pct = _f(r["pct_copy"], "{:.0f}%") if r["pct_copy"] is not None else (
            _f(r["pct_of_bound"], "{:.0f}%") if r["pct_of_bound"] is not None else "-")
        lines.append([
            r["case"], r["shape"] or "", r["dtype"] or "", r["device"] or "", r["baseline"] or "",
            _f(r["baseline_ms"], "{:.2f}"), _f(r["fastvat_ms"], "{:.2f}"), _f(r["speedup"], "{:.2f}x"),
            _compiled_text(r),
            _f(r["gbps"], "{:.1f}"), pct, _bar_text(r),
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)] if lines else [len(h) for h in head]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out.append("  ".join("-" * w for w in widths))
    for ln in lines:
        out.append("  ".join(str(x).ljust(w) for x, w in zip(ln, widths)))
    return "\n".join(out)


def _compiled_text(r) -> str:
    if r["compiled_ms"] is not None:
        return _f(r["compiled_ms"], "{:.2f}")
    note = r.get("compiled_note") or ""
    if note.startswith("skipped"):
        return "skip"
    return "n/a" if note else "-"


def _bar_text(r) -> str:
    if not r.get("bar"):
        return ""
    met = r.get("bar_met")
    mark = "ok" if met else ("MISS" if met is False else "?")
    return f"{r['bar']} {mark}"


DEFINITIONS = {
    "times": "median ms per call (torch.utils.benchmark.Timer, process thread count); *_iqr_ms: interquartile "
             "range; variants of one case are timed interleaved in rounds in the same run",
    "speedup": "baseline_ms / fastvat_ms; speedup_vs_compiled: compiled_ms / fastvat_ms",
    "gbps": "minimal bytes the op must move / fastvat time (perturb_ 6*N*s, l2_normalize sample/token 2*N*s, "
            "global 3*N*s, kl fwd+bwd 3*N*s, gather_add: T rows in/out + dense [V,H] weight grad)",
    "pct_copy": "gbps / same-run dst.copy_(src) rate moving the same bytes (copy also pays write-allocate, "
                "so a fused in-place op can exceed 100%)",
    "pct_of_bound": "fastvat step time / bare-pass bound (clean forward no_grad + iters x (forward + backward "
                    "w.r.t. the perturbation only) + forward + backward) x 100",
    "peak_mb": "extra peak memory of one forward+backward over the level before the call (CPU: peak RSS via "
               "/proc/self/clear_refs + VmHWM; CUDA: max_memory_allocated)",
    "value": "check rows: the derived ratio; step rows: VAT step / plain step",
    "malloc": "glibc malloc thresholds fixed (mmap >32 MiB, trim >64 MiB) so eager temporaries cost the same "
              "whatever earlier cases freed; see machine.malloc",
}


def write_json(path, rows, machine, config) -> None:
    with open(path, "w") as f:
        json.dump({"machine": machine, "config": config, "definitions": DEFINITIONS, "rows": rows}, f, indent=1,
                  default=str)


def write_csv(path, rows, machine) -> None:
    with open(path, "w", newline="") as f:
        for k, v in machine.items():
            f.write(f"# {k}: {v}\n")
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})


def write_png(path, rows, machine, title="fastvat benchmark") -> None:
    """Bar chart of the speedups over the eager baseline (and over torch.compile where measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [r for r in rows if r["suite"] != "check" and r.get("speedup") is not None]
    labels = [f"{r['case']} [{r['dtype']}]" + (f"\nvs {r['baseline']}" if r["suite"] != "ops" else "")
              for r in data]
    n = max(len(data), 1)
    fig, ax = plt.subplots(figsize=(10, 1.4 + 0.42 * n))
    ys = list(range(len(data)))
    sp = [r["speedup"] for r in data]
    spc = [r["speedup_vs_compiled"] if r.get("speedup_vs_compiled") is not None else 0.0 for r in data]
    ax.barh([y + 0.2 for y in ys], sp, height=0.4, label="vs eager baseline", color="#3b75af")
    ax.barh([y - 0.2 for y in ys], spc, height=0.4, label="vs torch.compile", color="#ef8636")
    for y, v in zip(ys, sp):
        ax.text(v, y + 0.2, f" {v:.2f}x", va="center", fontsize=7)
    for y, v in zip(ys, spc):
        if v:
            ax.text(v, y - 0.2, f" {v:.2f}x", va="center", fontsize=6, color="#a0522d")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of fastvat (higher is better; 1 = same time)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.text(0.01, 0.005, machine_line(machine), fontsize=6, color="#555")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(out_dir, stem, rows, machine, config, title=None) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "json": os.path.join(out_dir, f"{stem}.json"),
        "csv": os.path.join(out_dir, f"{stem}.csv"),
        "png": os.path.join(out_dir, f"{stem}.png"),
    }
    write_json(paths["json"], rows, machine, config)
    write_csv(paths["csv"], rows, machine)
    write_png(paths["png"], rows, machine, title or f"fastvat {stem} ({machine['device']})")
    return paths


def check(name, value, bar, met, note=None) -> dict:
    """A derived number with its bar from the issues (a 'check' row)."""
    return row(suite="check", case=name, value=value, bar=bar, bar_met=met, note=note)
