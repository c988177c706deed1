// csrc/cuda/embedding_gather_add.cu built against the CUDA emulator (see emu_tu.h).
#include "emu_tu.h"

#include "cuda/embedding_gather_add.cu"
