"""The commands in benchmarks/: the benchmark (smoke run, bad input, the busy-machine rule) and the
two-moons demo. The scripts run as a user runs them, in a fresh interpreter from the clone."""
import csv
import json
import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
PNG = b"\x89PNG\r\n\x1a\n"

SMOKE_CASES = {
    "perturb_ (reuse previous)", "l2_normalize sample masked", "l2_normalize token masked",
    "l2_normalize global masked", "kl_div_with_logits fwd+bwd", "embedding_gather_add fwd+bwd",
    "BERT: plain step (fwd+bwd)", "BERT: bare-pass bound", "BERT: VAT step (output)",
    "BERT: VAT step (output, logits=)", "VAT step (weight) V=1000", "VAT step (weight) V=8000", "sweep batch=2",
}


def _script(name, *args, timeout=600):
    return subprocess.run([sys.executable, os.path.join(BENCH, name), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_bench_smoke_writes_table_json_csv_png(tmp_path):
    pytest.importorskip("transformers")
    r = _script("run.py", "--smoke", "--no-progress", "--out", str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "speedup" in r.stdout and "perturb_ (reuse previous)" in r.stdout
    data = json.loads((tmp_path / "bench_cpu.json").read_text())
    machine = data["machine"]
    assert machine["torch"] == torch.__version__ and machine["cpu"] and machine["fastvat_backend"]
    timed = [row for row in data["rows"] if row["suite"] != "check"]
    assert {row["case"] for row in timed} == SMOKE_CASES
    for row in timed:
        assert _positive(row["baseline_ms"]), row
        assert row["fastvat_ms"] is None or (_positive(row["fastvat_ms"]) and _positive(row["speedup"])), row
        assert isinstance(row["busy"], bool) and row["load_1m_start"] >= 0 and row["other_cpu_cores"] >= 0, row
    assert all(_positive(row["gbps"]) and _positive(row["pct_copy"]) for row in timed if row["suite"] == "ops")
    step = next(row for row in timed if row["case"] == "BERT: VAT step (output)")
    assert _positive(step["pct_of_bound"]) and _positive(step["value"])
    checks = [row for row in data["rows"] if row["suite"] == "check"]
    assert checks and all(_positive(row["value"]) for row in checks)
    assert data["busy"] == any(row["busy"] for row in data["rows"])
    assert ("BUSY MACHINE" in r.stdout) == data["busy"]
    with open(tmp_path / "bench_cpu.csv") as f:
        lines = f.readlines()
    assert any(ln.startswith("# cpu:") for ln in lines)
    csv_rows = list(csv.DictReader(ln for ln in lines if not ln.startswith("#")))
    assert len(csv_rows) == len(data["rows"]) and float(csv_rows[0]["speedup"]) == pytest.approx(data["rows"][0]["speedup"])
    assert (tmp_path / "bench_cpu.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize("args", [["--no-such-flag"], ["--quick", "--full"], ["--cases", "nope"],
                                  ["--dtypes", "float33"]])
def test_bench_bad_input_exits_2_without_traceback(args):
    r = _script("run.py", *args, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "error:" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_bench_cuda_without_gpu_says_so():
    r = _script("run.py", "--device", "cuda", "--smoke", timeout=120)
    assert r.returncode == 2 and "no CUDA GPU" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture
def bench_modules(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import report
    import timing

    return report, timing


def test_busy_rows_withhold_their_verdicts(bench_modules, tmp_path):
    report, _ = bench_modules
    quiet = report.row(suite="ops", case="quiet", speedup=0.5, bar=">=2x", bar_met=False, busy=False,
                       other_cpu_cores=0.0)
    busy = report.row(suite="ops", case="loaded", speedup=0.5, bar=">=2x", bar_met=False, busy=True,
                      other_cpu_cores=1.4)
    table = report.format_table([busy, report.check("loaded speedup", 0.5, ">=2x", False, busy=True)])
    assert "MISS" in report.format_table([quiet]) and "BUSY" not in report.format_table([quiet])
    assert "MISS" not in table and ">=2x busy" in table and report.BUSY_LINE in table
    report.write_json(tmp_path / "b.json", [quiet, busy], {}, {})
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["busy"] is True and report.BUSY_LINE in data["warning"]
    assert data["rows"][1]["other_cpu_cores"] == 1.4


def test_load_watch_sees_other_processes(bench_modules):
    _, timing = bench_modules
    if not os.path.exists("/proc/stat"):
        pytest.skip("needs /proc/stat")
    spin = "import time\nt = time.time() + 3\nwhile time.time() < t: pass"
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.3)  # interpreters started
        watch = timing.LoadWatch()
        time.sleep(1.5)
        load = watch.stop()
    finally:
        for p in procs:
            p.wait()
    assert load["busy"] is True and load["other_cpu_cores"] > 0.5, load


def test_two_moons_vat_beats_supervised(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "demo.png"
    r = _script("two_moons.py", "--seeds", "2", "--steps", "150", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    per_seed = re.findall(r"seed \d+: supervised only\s+([\d.]+)%\s+VAT\s+([\d.]+)%", r.stdout)
    assert len(per_seed) == 2, r.stdout
    for sup, vat in per_seed:
        # 8 labels leave the supervised boundary ~20 points short; VAT's follows the moons
        assert float(vat) >= 95.0 and float(vat) - float(sup) >= 10.0, r.stdout
    assert out.read_bytes()[:8] == PNG


def test_two_moons_bad_input_exits_2():
    r = _script("two_moons.py", "--seeds", "0", timeout=120)
    assert r.returncode == 2 and "--seeds must be at least 1" in r.stderr
