// Included first by each emulated translation unit (kernels/*.cpp), before the one csrc/cuda/*.cu
// file it compiles. The build force-includes fvemu.h ahead of everything, so the .cu file builds as
// plain C++ against the emulator; this header adapts its host side to CPU tensors.
#pragma once

#include "common.h"
#include "cuda/cuda_utils.cuh"

#include <torch/library.h>

// The .cu file's own registration block (namespace fastvat, key CUDA) registers the same functions
// for namespace fastvat_emu and CPU tensors instead: the real fastvat ops stay untouched, even
// when the loaded fastvat._C has CUDA kernels of its own.
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL(fastvat_emu, CPU, m, C10_UID)

// CPU tensors stand for device memory: the host entry points' "must be a CUDA tensor" checks accept
// them, and their device index (-1 for a CPU tensor) becomes emulated device 0. Defined after every
// torch header is in, so only the .cu file's own code sees these.
#define is_cuda is_cpu
#define get_device() get_device() + 1
