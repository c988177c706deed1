// csrc/cuda/kl_div.cu built against the CUDA emulator (see emu_tu.h).
#include "emu_tu.h"

#include "cuda/kl_div.cu"
