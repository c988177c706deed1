// csrc/cuda/l2_normalize.cu built against the CUDA emulator (see emu_tu.h).
#include "emu_tu.h"

#include "cuda/l2_normalize.cu"
