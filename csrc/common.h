// Checks and shape arithmetic shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>

namespace fastvat {

// Elements per norm group for a contiguous tensor of `x`'s shape:
// global = all elements, sample = elements per index of dim 0, token = size of the last dim.
inline int64_t norm_group_length(const at::Tensor& x, const std::string& norm) {
  if (norm == "global") return x.numel();
  TORCH_CHECK(x.dim() >= 1, "fastvat: x must have at least one dim for norm='", norm, "'");
  if (norm == "sample") return x.size(0) == 0 ? 0 : x.numel() / x.size(0);
  if (norm == "token") return x.size(-1);
  TORCH_CHECK(false, "fastvat: norm must be 'global', 'sample' or 'token', got '", norm, "'");
}

// A leading-dims mask covers `inner` consecutive elements of x per mask entry.
inline int64_t mask_inner(const at::Tensor& x, const c10::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return 0;
  const auto& m = *mask;
  TORCH_CHECK(m.dim() <= x.dim(), "fastvat: mask has more dims than x");
  for (int64_t d = 0; d < m.dim(); ++d) {
    TORCH_CHECK(m.size(d) == x.size(d), "fastvat: mask shape ", m.sizes(), " is not a prefix of x's shape ", x.sizes());
  }
  TORCH_CHECK(m.scalar_type() == x.scalar_type(), "fastvat: mask must have x's dtype (the Python wrapper converts it)");
  TORCH_CHECK(m.device() == x.device(), "fastvat: mask must be on x's device");
  if (m.numel() == 0) return 0;
  return x.numel() / m.numel();
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fastvat: ", name, " must be a floating-point tensor, got ",
              t.scalar_type());
}

inline void check_same(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), "fastvat: ", an, " and ", bn, " must be on one device");
  TORCH_CHECK(a.sizes() == b.sizes(), "fastvat: ", an, " has shape ", a.sizes(), " but ", bn, " has shape ",
              b.sizes());
}

}  // namespace fastvat
