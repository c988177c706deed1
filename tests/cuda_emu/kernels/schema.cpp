// The fastvat_emu op namespace: csrc/fastvat.cpp's schemas, declared under another name so the
// emulated kernels can be registered next to the real extension's.
#include <torch/library.h>

#undef TORCH_LIBRARY
#define TORCH_LIBRARY(ns, m)                                                                                \
  static void fvemu_define_schemas(torch::Library&);                                                       \
  static const torch::detail::TorchLibraryInit fvemu_schemas_init(torch::Library::DEF, &fvemu_define_schemas, \
                                                                  "fastvat_emu", std::nullopt, __FILE__,   \
                                                                  __LINE__);                               \
  void fvemu_define_schemas(torch::Library& m)

#include "fastvat.cpp"
