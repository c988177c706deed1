"""Timing, peak memory, machine load and machine info for every benchmark in this folder.

Functions are timed with ``torch.utils.benchmark.Timer`` (it synchronises the accelerator around
each measurement) at the process's thread count. The variants of one case are timed interleaved,
round by round in a rotated order, and a ratio is the median of the per-round ratios: a change of
machine load between rounds then hits both sides of a ratio alike.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import math
import os
import platform
import signal
import statistics
import threading
import time
from dataclasses import dataclass

import torch
from torch.utils import benchmark as tbench


@dataclass
class Stat:
    """Seconds per call of one function: every sample pooled, plus the median of each round."""

    pooled: tbench.Measurement
    round_medians: list

    @property
    def median(self) -> float:
        return self.pooled.median

    @property
    def ms(self) -> float:
        return self.pooled.median * 1e3

    @property
    def iqr_ms(self) -> float:
        return self.pooled.iqr * 1e3


class Timings(dict):
    """{name: Stat} of one interleaved measurement, and the machine load while it ran."""

    load: dict


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure_many(fns: dict, *, device="cpu", min_run_time=1.0, rounds=3, min_reps=3, max_reps=60) -> Timings:
    """Time several functions interleaved (A B C, B C A, C A B, ...).

    ``min_run_time`` is the time budget per function. Fast functions are timed in one
    ``blocked_autorange`` block per round; slow ones (a call above a tenth of their budget per
    round) one call at a time, ``min_reps`` calls at least, spread over the rounds.
    """
    names = list(fns)
    first = {}
    for name in names:
        _sync(device)
        start = time.perf_counter()
        fns[name]()
        _sync(device)
        first[name] = time.perf_counter() - start
    timers = {n: tbench.Timer(stmt="fn()", globals={"fn": fns[n]}, num_threads=torch.get_num_threads())
              for n in names}
    per_round = {}
    for n in names:
        if first[n] * 10 * rounds >= min_run_time:
            reps = min(max(min_reps, math.ceil(min_run_time / max(first[n], 1e-9))), max_reps)
            per_round[n] = max(1, math.ceil(reps / rounds))
    samples = {n: [] for n in names}
    medians = {n: [] for n in names}
    watch = LoadWatch()
    for r in range(rounds):
        # a call pays for the allocations and cache state its predecessor left, so no function
        # may always follow the same one
        for n in names[r % len(names):] + names[: r % len(names)]:
            if n in per_round:
                got = tbench.Measurement.merge([timers[n].timeit(1) for _ in range(per_round[n])])[0]
            else:
                got = timers[n].blocked_autorange(min_run_time=min_run_time / rounds)
            samples[n].append(got)
            medians[n].append(got.median)
    out = Timings({n: Stat(tbench.Measurement.merge(samples[n])[0], medians[n]) for n in names})
    out.load = watch.stop()
    return out


def paired_ratio(a: Stat, b: Stat) -> float:
    """a / b as the median over rounds of a's round median / b's round median."""
    return statistics.median(x / y for x, y in zip(a.round_medians, b.round_medians))


# ---------------------------------------------------------------------------------------------
# machine load
# ---------------------------------------------------------------------------------------------
_TICK = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def loadavg():
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cpu_seconds():
    """(CPU seconds every process has used, CPU seconds this process has used), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal: idle and iowait are nobody's work; steal is
    # another virtual machine's
    busy = sum(fields[:8]) - fields[3] - fields[4]
    t = os.times()
    return busy * _TICK, t.user + t.system


class LoadWatch:
    """What else ran on the machine between construction and ``stop()``.

    Busy: other processes used more than a quarter of a core beyond the cores this process leaves
    free (plus the counters' resolution), measured from /proc/stat over exactly this window.
    Without /proc/stat: the 1-minute load average at the start or end exceeds the threads used by
    more than half a core. The load average alone is no verdict where /proc/stat exists: it lags a
    minute, so it still reads high right after a build on a machine that has gone quiet.
    """

    def __init__(self):
        self.threads = torch.get_num_threads()
        self.load_start = loadavg()
        self.t0, self.cpu0 = time.perf_counter(), _cpu_seconds()

    def stop(self) -> dict:
        wall = max(time.perf_counter() - self.t0, 1e-6)
        cpu1, load_end = _cpu_seconds(), loadavg()
        others = None
        if self.cpu0 is not None and cpu1 is not None:
            others = max((cpu1[0] - self.cpu0[0]) - (cpu1[1] - self.cpu0[1]), 0.0) / wall
            spare = max(_cores() - self.threads, 0)
            busy = others > spare + 0.25 + 4 * _TICK / wall
        elif self.load_start is not None:
            busy = max(self.load_start, load_end) > self.threads + 0.5
        else:
            busy = None
        return {"load_1m_start": self.load_start, "load_1m_end": load_end,
                "other_cpu_cores": None if others is None else round(others, 2), "busy": busy}


# ---------------------------------------------------------------------------------------------
# compile
# ---------------------------------------------------------------------------------------------
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
    background and take CPU from the measurements that follow."""
    with contextlib.suppress(Exception):
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1


def first_line(exc) -> str:
    msg = str(exc).strip()
    return f"{type(exc).__name__}: {msg.splitlines()[0][:120] if msg else ''}"


def try_compile(fn, warm, *, cap_s=120.0):
    """``torch.compile(fn)`` and ``warm(compiled)`` once under a time cap.

    Returns ``(compiled, note)``; compiled is None when it failed or ran out of time.
    """
    single_process_inductor()
    start = time.perf_counter()
    try:
        compiled = torch.compile(fn)
        with time_limit(cap_s):
            warm(compiled)
    except TimeLimit as exc:
        reset_dynamo()
        return None, f"compile {exc}"
    except Exception as exc:  # noqa: BLE001 - a failed compile is a result, not an error
        reset_dynamo()
        return None, f"compile failed: {first_line(exc)}"
    return compiled, f"compiled in {time.perf_counter() - start:.1f} s"


def reset_dynamo():
    with contextlib.suppress(Exception):
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------
_MALLOC = {"state": None}


def stable_malloc() -> str:
    """Fix glibc's malloc thresholds at the values its dynamic heuristic tends to (mmap above
    32 MiB, trim above 64 MiB), so that the cost of an eager composition's temporaries does not
    depend on which sizes earlier cases happened to free (the masked-l2 eager baseline ran 1.4 ms
    or 8 ms per call depending on history: page faults vs reused heap memory)."""
    if _MALLOC["state"] is None:
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            ok = libc.mallopt(-3, 32 << 20) == 1 and libc.mallopt(-1, 64 << 20) == 1  # M_MMAP_ / M_TRIM_THRESHOLD
            _MALLOC["state"] = "glibc mmap_threshold=32MiB trim_threshold=64MiB" if ok else "default (mallopt failed)"
        except (OSError, AttributeError):
            _MALLOC["state"] = "default (not glibc)"
    return _MALLOC["state"]


def _proc_status_kb(key: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_extra_bytes(fn, *, device="cpu"):
    """Peak memory above the level before the call, during one call of ``fn()``; None if unknown.

    CUDA: ``max_memory_allocated`` after a peak reset. CPU: the peak resident set (VmHWM, reset
    through /proc/self/clear_refs) minus the resident set before the call; large tensors come from
    mmap and go back to the OS when freed, so this counts the pages the call really touched. Run
    ``fn`` once before, so that one-time allocations are not counted.
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
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
    except OSError:
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
        "cpu_count": _cores(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": loadavg(),
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

