"""The emulated kernel tests under a sanitizer build, or with line coverage of csrc/cuda/.

    python tests/cuda_emu/variants.py asan       # ASan + UBSan build, tests/test_cuda_emu.py under it
    python tests/cuda_emu/variants.py coverage   # gcov build, the same tests, a gcovr report of csrc/cuda/

Extra arguments go to pytest (e.g. -k kl). Run from anywhere; needs g++ (and gcovr for coverage:
pip install gcovr). The coverage report is written to docs/cuda_emulation_coverage.txt.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import build as emu_build  # noqa: E402

REPORT = os.path.join(REPO, "docs", "cuda_emulation_coverage.txt")


def _pytest(lib, extra_env, args):
    env = dict(os.environ, FVEMU_LIB=lib, PYTHONPATH=os.pathsep.join(
        p for p in (REPO, os.environ.get("PYTHONPATH")) if p), **extra_env)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(REPO, "tests", "test_cuda_emu.py")]
    t0 = time.monotonic()
    rc = subprocess.call(cmd + list(args), cwd=REPO, env=env)
    print(f"tests: {time.monotonic() - t0:.0f} s, exit status {rc}", file=sys.stderr)
    return rc


def _runtime(name):
    out = subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True, check=True).stdout.strip()
    if not os.path.isabs(out):
        raise SystemExit(f"cannot find {name} (g++ -print-file-name)")
    return out


def asan_env():
    """What a process needs to load the asan build: the sanitizer runtime loaded before anything else
    of the (uninstrumented) interpreter; leaks are the interpreter's and torch's, not the kernels'."""
    # (libstdc++ too: ASan's C++ exception interceptor needs it loaded when ASan starts, and the
    # interpreter does not link it)
    return {"LD_PRELOAD": " ".join((_runtime("libasan.so"), _runtime("libstdc++.so"))),
           "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:halt_on_error=1",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
           # two resume orders, not six: ASan makes each fiber switch slow, and the default run
           # already compares all six
           "FVEMU_ORDERS": "forward,greedy"}


def asan(args):
    t0 = time.monotonic()
    lib = emu_build.build("asan")
    print(f"asan build: {time.monotonic() - t0:.0f} s", file=sys.stderr)
    # -s: a sanitizer report goes to stderr and ends the process; pytest's output capture would lose it
    return _pytest(lib, asan_env(), ["-s"] + list(args))


def coverage(args):
    t0 = time.monotonic()
    lib = emu_build.build("coverage")
    print(f"coverage build: {time.monotonic() - t0:.0f} s", file=sys.stderr)
    objdir = os.path.dirname(lib)
    for f in glob.glob(os.path.join(objdir, "*.gcda")):
        os.remove(f)
    rc = _pytest(lib, {}, args)
    cuda = os.path.join(REPO, "csrc", "cuda")
    common = ["gcovr", "--root", REPO, "--filter", cuda + os.sep, "--object-directory", objdir,
              "--exclude-unreachable-branches", "--gcov-ignore-parse-errors=negative_hits.warn_once_per_file",
              # a line counts once, executed when any template instantiation executed it
              "--merge-lines"]
    # per file: lines, executed, percent and the line numbers never executed; then the totals
    report = subprocess.run(common + ["--txt", "--txt-summary"], capture_output=True, text=True, cwd=REPO)
    text = report.stdout + report.stderr
    print(text)
    os.makedirs(os.path.dirname(REPORT), exist_ok=True)
    with open(REPORT, "w") as f:
        f.write("Line coverage of csrc/cuda/ by tests/test_cuda_emu.py on the CUDA emulator\n"
                "(python tests/cuda_emu/variants.py coverage; see docs/cuda_emulation.md)\n\n")
        f.write(report.stdout)
    print(f"report: {REPORT}", file=sys.stderr)
    return rc or report.returncode


def main(argv):
    if not argv or argv[0] not in ("asan", "coverage"):
        print(__doc__)
        return 2
    return {"asan": asan, "coverage": coverage}[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
