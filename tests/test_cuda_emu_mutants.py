"""The emulated-kernel tests can fail: seeded bugs in a copy of csrc/ must each be caught.

Each mutant is one textual change to a copy of the kernel sources (which must match exactly once, so
a kernel edit that removes the mutated line fails here instead of passing vacuously), built with only
the mutated op (tests/cuda_emu/build.py --csrc, cached under build/cuda_emu/mutants/) and checked by a
focused selection of tests/test_cuda_emu.py in a subprocess, which must report failures.

Minutes per mutant on 2 cores (mostly the build): skipped unless FASTVAT_EMU_MUTANTS=1 (.ci/run sets it).
"""
import os
import subprocess
import sys

import pytest

from emu_helpers import HERE

REPO = os.path.dirname(HERE)

# name: (file under csrc/, original text, mutated text, op to build, pytest -k selection)
MUTANTS = {
    # block_reduce's first barrier: a warp may overwrite smem while a slower warp still reads the
    # previous reduction's totals there (caught by the resume orders disagreeing)
    "block-reduce-no-first-barrier": (
        "cuda/cuda_utils.cuh", "  __syncthreads();  // smem may still be read by a previous reduction\n", "",
        "kl_div", "test_kl and 3x5000 and fp32"),
    # block_reduce's second barrier: lanes read the per-warp totals before every warp wrote them
    "block-reduce-no-second-barrier": (
        "cuda/cuda_utils.cuh",
        "    for (int k = 0; k < K; ++k) smem[k * 32 + warp] = v[k];\n  }\n  __syncthreads();\n",
        "    for (int k = 0; k < K; ++k) smem[k * 32 + warp] = v[k];\n  }\n",
        "kl_div", "test_kl and 3x5000 and fp32"),
    # idle lanes of a short row leave before the team reduction (a deadlock or lost lanes on a GPU)
    "kl-idle-lanes-exit": (
        "cuda/kl_div.cu", "  const KlEdges<A> ed = kl_load_edges<T>(row, P, Q);\n\n  Online<A> st;\n",
        "  const KlEdges<A> ed = kl_load_edges<T>(row, P, Q);\n"
        "  if (row.tid >= row.nb && row.tid >= row.head && row.tid >= row.tail) return;\n\n  Online<A> st;\n",
        "kl_div", "test_kl_misaligned and 9x20 and fp32"),
    # off by one at a row's tail: one zero logit pair too many in pass 1
    "kl-tail-off-by-one": (
        "cuda/kl_div.cu", "  if (row.tid < row.tail) st.add1(ed.tp, ed.tq);\n",
        "  if (row.tid <= row.tail) st.add1(ed.tp, ed.tq);\n",
        "kl_div", "test_kl and 13x37 and fp32"),
    # the update kernel leaves the last element of the tensor alone
    "perturb-chunk-end": (
        "cuda/perturb.cu", "  const int64_t a = blk * cs;\n  const int64_t e = imin(a + cs, n);\n",
        "  const int64_t a = blk * cs;\n  const int64_t e = imin(a + cs, n - 1);\n",
        "perturb", "test_perturb_sizes_and_alignment"),
    # a segment that crosses chunks loses its last chunk's partial sum
    "segsum-last-chunk": (
        "cuda/embedding_gather_add.cu", "for (int64_t d = c + 1; d <= last; ++d)", "for (int64_t d = c + 1; d < last; ++d)",
        "embedding_gather_add", "test_embedding_gather_add_backward and fp32 and long-segments"),
    # the chunked kernels skip the last scalar of a tail
    "l2-scale-tail": (
        "cuda/l2_normalize.cu",
        "  for (int64_t i = sp.be + tid; i < e; i += kChunkThreads) {\n    out[i] =",
        "  for (int64_t i = sp.be + tid; i + 1 < e; i += kChunkThreads) {\n    out[i] =",
        "l2_normalize", "test_l2_normalize and fp32 and 8x20003"),
    # off by one when loading a row's tail: a read past the last row, harmless to the results (the
    # value is never used), caught only by AddressSanitizer
    "kl-tail-read-past-end": (
        "cuda/kl_div.cu", "  if (row.tid < row.tail) {\n    ed.tp", "  if (row.tid <= row.tail) {\n    ed.tp",
        "kl_div", "test_kl and 13x37 and fp32 and grad", "asan"),
}

pytestmark = pytest.mark.skipif(os.environ.get("FASTVAT_EMU_MUTANTS") != "1",
                                reason="mutation tests build one library per mutant: set FASTVAT_EMU_MUTANTS=1")


def _write_if_changed(path, text):
    """Leaves an unchanged file alone, so that ninja does not rebuild a cached mutant."""
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def mutant_sources(name):
    """A copy of csrc/ under build/cuda_emu/mutants/<name>/csrc with the mutation applied."""
    rel, old, new = MUTANTS[name][:3]
    root = os.path.join(REPO, "build", "cuda_emu", "mutants", name)
    src = os.path.join(REPO, "csrc")
    for dirpath, _, files in os.walk(src):
        for f in files:
            path = os.path.join(dirpath, f)
            with open(path) as fh:
                text = fh.read()
            r = os.path.relpath(path, src)
            if r == rel:
                assert text.count(old) == 1, f"mutant {name}: the text to mutate occurs {text.count(old)} times in {rel}"
                text = text.replace(old, new)
            _write_if_changed(os.path.join(root, "csrc", r), text)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutant_is_caught(name):
    root = mutant_sources(name)
    op, select = MUTANTS[name][3], MUTANTS[name][4]
    variant = MUTANTS[name][5] if len(MUTANTS[name]) > 5 else "default"
    build = subprocess.run(
        [sys.executable, os.path.join(HERE, "cuda_emu", "build.py"), "--csrc", os.path.join(root, "csrc"),
         "--build-dir", os.path.join(root, "build"), "--ops", op, "--variant", variant],
        capture_output=True, text=True, cwd=REPO)
    assert build.returncode == 0, build.stderr[-3000:]
    lib = build.stdout.strip().splitlines()[-1]
    env = dict(os.environ, FVEMU_LIB=lib)
    if variant == "asan":
        sys.path.insert(0, os.path.join(HERE, "cuda_emu"))
        import variants

        env.update(variants.asan_env())
    # -s under ASan: its report goes to stderr and ends the process, which pytest's capture would lose
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x"]
                         + (["-s"] if variant == "asan" else []) + [os.path.join(HERE, "test_cuda_emu.py"), "-k", select],
                         capture_output=True, text=True, cwd=REPO, env=env)
    out = run.stdout[-4000:] + run.stderr[-2000:]
    if variant == "asan":  # the sanitizer ends the process at the first report
        assert "AddressSanitizer" in out, f"mutant {name} survived (rc {run.returncode}):\n{out}"
        return
    # 1: tests ran and some failed (not 2-5: an interrupted run, a usage error, nothing collected)
    assert run.returncode == 1 and " failed" in out, f"mutant {name} survived (rc {run.returncode}):\n{out}"
