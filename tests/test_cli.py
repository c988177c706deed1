"""The command line: help, bad input (one line on stderr, exit 2), demo and a smoke benchmark run.

Most checks call ``fastvat.__main__.main(argv)`` in-process (a fresh interpreter costs seconds of
imports); one test runs ``python -m fastvat`` end to end.
"""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from fastvat.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _our_lines(stderr):
    # Import-time warnings from torch (e.g. "No CUDA runtime is found") are not ours.
    return [ln for ln in stderr.splitlines() if ln.strip() and "cpp_extension" not in ln and "Warning" not in ln]


def test_help(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("bench", "demo", "experiment"):
        assert cmd in out
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--device" in out and "--out" in out and "--quick" in out


@pytest.mark.parametrize("args", [["--bogus"], ["bench", "--bogus"], ["frobnicate"], [], ["demo", "--steps", "x"],
                                  ["bench", "--quick", "--full"], ["demo", "--seeds", "0"],
                                  ["bench", "--device", "tpu"]])
def test_bad_input_is_one_line_and_rc2(args, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = _our_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("fastvat: error:")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_device_cuda_without_gpu(capsys):
    assert main(["bench", "--device", "cuda", "--smoke"]) == 2
    lines = _our_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "cuda" in lines[0].lower() and "gpu" in lines[0].lower()


def test_end_to_end_bad_flag_exit_code():
    r = subprocess.run([sys.executable, "-m", "fastvat", "bench", "--no-such-flag"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert len(_our_lines(r.stderr)) == 1 and "--no-such-flag" in r.stderr


def test_demo_writes_png(tmp_path, capsys):
    out = tmp_path / "demo.png"
    threads = torch.get_num_threads()
    assert main(["demo", "--seeds", "1", "--steps", "40", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # the demo puts the thread count back
    stdout = capsys.readouterr().out
    assert "supervised only" in stdout and "VAT" in stdout
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_smoke_writes_outputs(tmp_path, capsys):
    pytest.importorskip("transformers")
    assert main(["bench", "--smoke", "--no-progress", "--out", str(tmp_path)]) == 0
    stdout = capsys.readouterr().out
    assert "speedup" in stdout and "perturb_" in stdout  # the one table
    for ext in ("json", "csv", "png"):
        assert (tmp_path / f"bench_cpu.{ext}").exists()
    assert (tmp_path / "bench_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "bench_cpu.json").read_text())
    machine = data["machine"]
    assert machine["fastvat_backend"] and machine["torch"] == torch.__version__ and machine["cpu"]
    cases = [row["case"] for row in data["rows"]]
    assert any(c.startswith("perturb_") for c in cases) and any("VAT step" in c for c in cases)
    assert not [row for row in data["rows"] if (row["note"] or "").startswith("error")]
    with open(tmp_path / "bench_cpu.csv") as f:
        lines = f.readlines()
    comments = [ln for ln in lines if ln.startswith("#")]
    assert any(ln.startswith("# cpu:") for ln in comments) and any("fastvat_backend" in ln for ln in comments)
    rows = list(csv.DictReader(ln for ln in lines if not ln.startswith("#")))
    assert rows and "speedup" in rows[0]
