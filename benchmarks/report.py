"""Benchmark rows and their outputs: the printed table, JSON, CSV and a PNG chart."""
from __future__ import annotations

import csv
import json
import math
import os

LOAD_COLUMNS = ["load_1m_start", "load_1m_end", "other_cpu_cores", "busy"]
COLUMNS = [
    "suite", "case", "shape", "dtype", "device",
    "baseline", "baseline_ms", "baseline_iqr_ms",
    "fastvat_ms", "fastvat_iqr_ms", "speedup",
    "compiled_ms", "speedup_vs_compiled", "compiled_note",
    "gbps", "copy_gbps", "pct_copy",
    "bound_ms", "pct_of_bound",
    "baseline_peak_mb", "fastvat_peak_mb", "compiled_peak_mb",
    "value", "bar", "bar_met", "note",
] + LOAD_COLUMNS

BUSY_LINE = "BUSY MACHINE: ratios unreliable"

DEFINITIONS = {
    "times": "median ms per call (torch.utils.benchmark.Timer, process thread count); *_iqr_ms: interquartile "
             "range; the variants of one case are timed interleaved, in rounds, in the same run",
    "speedup": "baseline / fastvat, the median over rounds of the per-round ratio; speedup_vs_compiled: "
               "compiled / fastvat, likewise",
    "gbps": "minimal bytes the op must move / fastvat time (perturb_ 6*N*s, l2_normalize sample/token 2*N*s, "
            "global 3*N*s, kl fwd+bwd 3*N*s, gather_add: T rows in/out + dense [V,H] weight grad)",
    "pct_copy": "gbps / same-run dst.copy_(src) rate moving the same bytes (copy also pays write-allocate, "
                "so a fused in-place op can exceed 100%)",
    "pct_of_bound": "fastvat step time / bare-pass bound (clean forward no_grad + iters x (forward + backward "
                    "w.r.t. the perturbation only) + forward + backward) x 100",
    "peak_mb": "extra peak memory of one forward+backward over the level before the call (CPU: peak RSS via "
               "/proc/self/clear_refs + VmHWM; CUDA: max_memory_allocated)",
    "value": "check rows: the derived ratio; step rows: VAT step / plain step",
    "busy": "other processes used more than 0.25 of a core beyond the cores the benchmark leaves free while "
            "the case was timed (other_cpu_cores, from /proc/stat; without it: 1-minute load average at the "
            "start or end above threads + 0.5); a busy row's bar verdict is withheld",
    "malloc": "glibc malloc thresholds fixed (mmap >32 MiB, trim >64 MiB) so eager temporaries cost the same "
              "whatever earlier cases freed; see machine.malloc",
}


def row(**kw) -> dict:
    unknown = set(kw) - set(COLUMNS)
    if unknown:
        raise KeyError(f"unknown row fields {sorted(unknown)}")
    return {c: kw.get(c) for c in COLUMNS}


def check(name, value, bar, met, note=None, busy=None) -> dict:
    """A derived number with its bar (a 'check' row)."""
    return row(suite="check", case=name, value=value, bar=bar, bar_met=met, note=note, busy=busy)


def busy_rows(rows) -> list:
    return [r for r in rows if r.get("busy")]


def _f(x, fmt):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return fmt.format(x)


def machine_line(m: dict) -> str:
    s = (f"{m['cpu']} | {m['torch_threads']} threads | torch {m['torch']} | CUDA {m['cuda']} | "
         f"fastvat {m['fastvat']} backend={m['fastvat_backend']}")
    if m.get("gpu"):
        s += f" | GPU {m['gpu']}"
    if m.get("load_average_1m") is not None:
        s += f" | load {m['load_average_1m']}"
    return s


def _bar_text(r) -> str:
    if not r.get("bar"):
        return "informational" if (r.get("note") or "").startswith("informational") else ""
    if r.get("busy"):
        return f"{r['bar']} busy"
    met = r.get("bar_met")
    return f"{r['bar']} {'ok' if met else 'MISS' if met is False else '?'}"


def _compiled_text(r) -> str:
    if r["compiled_ms"] is not None:
        return _f(r["compiled_ms"], "{:.2f}")
    note = r.get("compiled_note") or ""
    if note.startswith("skipped"):
        return "skip"
    return "n/a" if note else "-"


def _load_text(r) -> str:
    return "busy" if r.get("busy") else _f(r.get("other_cpu_cores"), "{:.2f}")


def format_table(rows) -> str:
    head = ["case", "shape", "dtype", "dev", "baseline", "base ms", "fastvat ms", "speedup",
            "compile ms", "GB/s", "%copy|%bound", "bar", "others"]
    lines = []
    for r in rows:
        if r["suite"] == "check":
            lines.append([r["case"], "", "", "", "", "", "", _f(r["value"], "{:.3f}"), "", "", "", _bar_text(r),
                          "busy" if r.get("busy") else ""])
            continue
        pct = r["pct_copy"] if r["pct_copy"] is not None else r["pct_of_bound"]
        lines.append([
            r["case"], r["shape"] or "", r["dtype"] or "", r["device"] or "", r["baseline"] or "",
            _f(r["baseline_ms"], "{:.2f}"), _f(r["fastvat_ms"], "{:.2f}"), _f(r["speedup"], "{:.2f}x"),
            _compiled_text(r), _f(r["gbps"], "{:.1f}"), _f(pct, "{:.0f}%"), _bar_text(r), _load_text(r),
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(x).ljust(w) for x, w in zip(ln, widths)) for ln in lines]
    busy = busy_rows(rows)
    if busy:
        out.append(f"{BUSY_LINE}: other processes took CPU during {len(busy)} of {len(rows)} rows (marked busy; "
                   f"'others' = their cores); their bar verdicts are withheld. Rerun on a quiet machine.")
    return "\n".join(out)


def write_json(path, rows, machine, config) -> None:
    busy = busy_rows(rows)
    doc = {"machine": machine, "config": config, "busy": bool(busy),
           "warning": f"{BUSY_LINE} ({len(busy)} busy rows)" if busy else None,
           "definitions": DEFINITIONS, "rows": rows}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)


def write_csv(path, rows, machine) -> None:
    with open(path, "w", newline="") as f:
        for k, v in machine.items():
            f.write(f"# {k}: {v}\n")
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})


def write_png(path, rows, machine, title) -> None:
    """Bar chart of the speedups over the eager baseline (and over torch.compile where measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [r for r in rows if r["suite"] != "check" and r.get("speedup") is not None]
    labels = [f"{r['case']} [{r['dtype']}]" + (f"\nvs {r['baseline']}" if r["suite"] != "ops" else "")
              + (" (busy)" if r.get("busy") else "") for r in data]
    fig, ax = plt.subplots(figsize=(10, 1.4 + 0.42 * max(len(data), 1)))
    ys = list(range(len(data)))
    sp = [r["speedup"] for r in data]
    spc = [r["speedup_vs_compiled"] or 0.0 for r in data]
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
    ax.set_title(title + (f" - {BUSY_LINE}" if busy_rows(rows) else ""), fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.text(0.01, 0.005, machine_line(machine), fontsize=6, color="#555")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_table(path, rows, machine) -> None:
    """The printed table (machine line first), so table.txt always says what the JSON beside it says."""
    with open(path, "w") as f:
        f.write(machine_line(machine) + "\n" + format_table(rows) + "\n")


def write_outputs(out_dir, stem, rows, machine, config, title, png=True) -> dict:
    """JSON, CSV and table.txt (and the PNG unless ``png`` is False); returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{stem}.{ext}") for ext in ("json", "csv", "png")}
    write_json(paths["json"], rows, machine, config)
    write_csv(paths["csv"], rows, machine)
    paths["table"] = os.path.join(out_dir, "table.txt")
    write_table(paths["table"], rows, machine)
    if png:
        write_png(paths["png"], rows, machine, title)
    else:
        del paths["png"]
    return paths


def main(argv=None) -> int:
    """``python benchmarks/report.py DIR/bench_cpu.json``: rewrite DIR/table.txt from the JSON."""
    import argparse

    ap = argparse.ArgumentParser(prog="benchmarks/report.py", description=main.__doc__)
    ap.add_argument("json", nargs="+", help="bench_<device>.json files written by benchmarks/run.py")
    for path in ap.parse_args(argv).json:
        with open(path) as f:
            doc = json.load(f)
        out = os.path.join(os.path.dirname(path), "table.txt")
        write_table(out, doc["rows"], doc["machine"])
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
