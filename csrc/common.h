// Checks and shape arithmetic shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

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

// perturb_'s arguments, on either backend: floating weight/direction/delta of one shape and device,
// delta in weight's dtype and not weight itself, a finite scale.
inline void check_perturb_args(const at::Tensor& weight, const at::Tensor& direction, const at::Tensor& delta,
                               double scale) {
  check_floating(weight, "weight");
  check_floating(direction, "direction");
  check_floating(delta, "delta");
  check_same(direction, "direction", weight, "weight");
  check_same(delta, "delta", weight, "weight");
  TORCH_CHECK(delta.scalar_type() == weight.scalar_type(), "fastvat: perturb_: delta must have weight's dtype ",
              weight.scalar_type(), ", got ", delta.scalar_type());
  TORCH_CHECK(std::isfinite(scale), "fastvat: perturb_: scale must be finite, got ", scale);
  TORCH_CHECK(!weight.is_same(delta), "fastvat: perturb_: weight and delta must be different tensors");
}

// l2_normalize's x, baseline and scale, on either backend (norm and mask: norm_group_length, mask_inner).
inline void check_l2_args(const at::Tensor& x, const c10::optional<at::Tensor>& baseline, double scale) {
  check_floating(x, "x");
  TORCH_CHECK(std::isfinite(scale), "fastvat: l2_normalize: scale must be finite, got ", scale);
  if (!baseline.has_value() || !baseline->defined()) return;
  check_same(*baseline, "baseline", x, "x");
  TORCH_CHECK(baseline->scalar_type() == x.scalar_type(), "fastvat: l2_normalize: baseline must have x's dtype ",
              x.scalar_type(), ", got ", baseline->scalar_type());
}

// kl_div_with_logits' arguments, on either backend: 2-D floating [N, C] logits of one dtype, shape
// and device; a mask (optional) in the accumulation dtype, on that device, one entry per row.
inline void check_kl_args(const at::Tensor& p, const at::Tensor& q, const c10::optional<at::Tensor>& mask) {
  check_floating(p, "p_logits");
  check_floating(q, "q_logits");
  TORCH_CHECK(q.dim() == 2, "fastvat: kl_div_with_logits: q_logits must be 2-D [N, C], got shape ", q.sizes());
  TORCH_CHECK(q.size(1) > 0, "fastvat: kl_div_with_logits: q_logits has no classes (shape ", q.sizes(),
              "): a softmax over zero classes is undefined");
  check_same(p, "p_logits", q, "q_logits");
  TORCH_CHECK(p.scalar_type() == q.scalar_type(), "fastvat: kl_div_with_logits: p_logits must have q_logits' dtype ",
              q.scalar_type(), ", got ", p.scalar_type());
  if (!mask.has_value() || !mask->defined()) return;
  const auto acc = at::toOpMathType(q.scalar_type());
  TORCH_CHECK(mask->scalar_type() == acc, "fastvat: kl_div_with_logits: mask must have dtype ", acc,
              " for q_logits of dtype ", q.scalar_type(), ", got ", mask->scalar_type());
  TORCH_CHECK(mask->device() == q.device(), "fastvat: kl_div_with_logits: mask is on ", mask->device(),
              " but q_logits is on ", q.device());
  TORCH_CHECK(mask->numel() == q.size(0), "fastvat: kl_div_with_logits: mask must have one entry per row (",
              q.size(0), "), got shape ", mask->sizes());
}

inline void check_index_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, "fastvat: ", op, ": ", name,
              " must be an int64 or int32 tensor of indices, got ", t.scalar_type());
}

// embedding_gather_add's arguments, on either backend: a floating 2-D [V, H] weight, a delta of
// weight's dtype and width, int32/int64 ids and delta_index of one shape, everything on weight's
// device, padding_idx -1 or a row of weight. The index values are checked by the kernels.
inline void check_gather_add_args(const at::Tensor& weight, const at::Tensor& ids, const at::Tensor& delta,
                                  const at::Tensor& delta_index, int64_t padding_idx) {
  check_floating(weight, "weight");
  check_floating(delta, "delta");
  TORCH_CHECK(weight.dim() == 2,
              "fastvat: embedding_gather_add: weight must be 2-D [num_embeddings, dim], got shape ", weight.sizes());
  TORCH_CHECK(delta.dim() == 2 && delta.size(1) == weight.size(1),
              "fastvat: embedding_gather_add: delta must be 2-D [rows, ", weight.size(1),
              "] to match weight, got shape ", delta.sizes());
  TORCH_CHECK(delta.scalar_type() == weight.scalar_type(),
              "fastvat: embedding_gather_add: delta must have weight's dtype ", weight.scalar_type(), ", got ",
              delta.scalar_type());
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&ids, "ids"}, {&delta, "delta"},
                                {&delta_index, "delta_index"}}) {
    TORCH_CHECK(t->device() == weight.device(), "fastvat: embedding_gather_add: ", name, " is on ", t->device(),
                " but weight is on ", weight.device());
  }
  check_index_dtype(ids, "embedding_gather_add", "ids");
  check_index_dtype(delta_index, "embedding_gather_add", "delta_index");
  TORCH_CHECK(delta_index.sizes() == ids.sizes(), "fastvat: embedding_gather_add: delta_index has shape ",
              delta_index.sizes(), " but ids has shape ", ids.sizes());
  TORCH_CHECK(padding_idx >= -1 && padding_idx < weight.size(0),
              "fastvat: embedding_gather_add: padding_idx must be -1 or in [0, ", weight.size(0), "), got ",
              padding_idx);
}

// embedding_gather_add_backward's arguments, on either backend: a floating grad of shape
// ids.shape + [H], int32/int64 ids and delta_index of one shape on grad's device, row counts >= 0,
// padding_idx -1 or a row of the weight gradient.
inline void check_gather_add_backward_args(const at::Tensor& grad, const at::Tensor& ids,
                                           const at::Tensor& delta_index, int64_t num_weight_rows,
                                           int64_t num_delta_rows, int64_t padding_idx) {
  check_floating(grad, "grad");
  TORCH_CHECK(grad.dim() == ids.dim() + 1 && grad.sizes().slice(0, ids.dim()) == ids.sizes(),
              "fastvat: embedding_gather_add_backward: grad must have shape ids.shape + [dim], got ", grad.sizes(),
              " for ids of shape ", ids.sizes());
  TORCH_CHECK(delta_index.sizes() == ids.sizes(), "fastvat: embedding_gather_add_backward: delta_index has shape ",
              delta_index.sizes(), " but ids has shape ", ids.sizes());
  TORCH_CHECK(ids.device() == grad.device() && delta_index.device() == grad.device(),
              "fastvat: embedding_gather_add_backward: ids and delta_index must be on grad's device ", grad.device());
  check_index_dtype(ids, "embedding_gather_add_backward", "ids");
  check_index_dtype(delta_index, "embedding_gather_add_backward", "delta_index");
  TORCH_CHECK(num_weight_rows >= 0 && num_delta_rows >= 0,
              "fastvat: embedding_gather_add_backward: num_weight_rows and num_delta_rows must be >= 0");
  TORCH_CHECK(padding_idx >= -1 && padding_idx < std::max<int64_t>(num_weight_rows, 1),
              "fastvat: embedding_gather_add_backward: padding_idx must be -1 or in [0, ", num_weight_rows, "), got ",
              padding_idx);
}

}  // namespace fastvat
