// csrc/cuda/perturb.cu built against the CUDA emulator (see emu_tu.h).
#include "emu_tu.h"

#include "cuda/perturb.cu"
