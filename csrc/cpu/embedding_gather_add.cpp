// CPU kernels of fastvat::embedding_gather_add (out[n] = weight[ids[n]] + delta[delta_index[n]])
// and its backward (row-wise segment sums of the output gradient).
//
// The forward is one pass over the output rows. The backward is deterministic: positions are
// bucketed by target row with a stable counting sort, then each target row sums its positions
// in increasing order (in the accumulation dtype) and is written once; rows are split over
// threads. These loops are memory-bound row copies that the compiler vectorizes, so this file
// does not use the SIMD region of cpu_vec.h.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common.h"

namespace fastvat {
namespace cpu {
namespace {

// An index tensor (dtype checked by check_gather_add*_args) as a flat int64 tensor.
at::Tensor as_long_index(const at::Tensor& t) { return t.to(at::kLong).contiguous().reshape({-1}); }

void check_index_range(const at::Tensor& idx, int64_t rows, const char* op, const char* name, const char* table) {
  const int64_t* ix = idx.const_data_ptr<int64_t>();
  const int64_t n = idx.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_INDEX(ix[i] >= 0 && ix[i] < rows, "fastvat: ", op, ": ", name, " contains ", ix[i],
                      " (at flat position ", i, "), out of range for ", table, " with ", rows, " rows");
  }
}

template <typename T>
void gather_add_kernel(const T* w, const int64_t* ids, const T* d, const int64_t* di, T* out, int64_t N, int64_t H) {
  using acc_t = at::opmath_type<T>;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(H, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const T* a = w + ids[n] * H;
      const T* b = d + di[n] * H;
      T* o = out + n * H;
      for (int64_t j = 0; j < H; ++j) o[j] = static_cast<T>(static_cast<acc_t>(a[j]) + static_cast<acc_t>(b[j]));
    }
  });
}

// out[r] = sum of grad[n] over positions n with idx[n] == r (in increasing n); 0 for rows with
// no position and for r == skip_row.
template <typename T>
void segment_sum_kernel(const T* grad, const int64_t* idx, int64_t N, int64_t H, int64_t R, int64_t skip_row,
                        T* out) {
  using acc_t = at::opmath_type<T>;
  std::vector<int64_t> start(static_cast<size_t>(R) + 1, 0);
  for (int64_t n = 0; n < N; ++n) {
    if (idx[n] != skip_row) ++start[idx[n] + 1];
  }
  for (int64_t r = 0; r < R; ++r) start[r + 1] += start[r];
  std::vector<int64_t> order(static_cast<size_t>(start[R]));
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t n = 0; n < N; ++n) {
      if (idx[n] != skip_row) order[fill[idx[n]]++] = n;
    }
  }
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(H, 1));
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> acc(static_cast<size_t>(H));
    for (int64_t r = r0; r < r1; ++r) {
      T* o = out + r * H;
      const int64_t b = start[r], e = start[r + 1];
      if (b == e) {
        std::fill(o, o + H, T(0));
        continue;
      }
      if (e - b == 1) {
        std::copy(grad + order[b] * H, grad + order[b] * H + H, o);
        continue;
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t k = b; k < e; ++k) {
        const T* g = grad + order[k] * H;
        for (int64_t j = 0; j < H; ++j) acc[j] += static_cast<acc_t>(g[j]);
      }
      for (int64_t j = 0; j < H; ++j) o[j] = static_cast<T>(acc[j]);
    }
  });
}

at::Tensor embedding_gather_add_cpu(const at::Tensor& weight, const at::Tensor& ids, const at::Tensor& delta,
                                    const at::Tensor& delta_index, int64_t padding_idx) {
  check_gather_add_args(weight, ids, delta, delta_index, padding_idx);
  const int64_t V = weight.size(0), U = delta.size(0), H = weight.size(1);
  const at::Tensor idx = as_long_index(ids);
  const at::Tensor didx = as_long_index(delta_index);
  check_index_range(idx, V, "embedding_gather_add", "ids", "weight");
  check_index_range(didx, U, "embedding_gather_add", "delta_index", "delta");
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(H);
  at::Tensor out = at::empty(shape, weight.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t N = idx.numel();
  if (N == 0 || H == 0) return out;
  const at::Tensor wc = weight.contiguous(), dc = delta.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "fastvat_embedding_gather_add_cpu", [&] {
    gather_add_kernel<scalar_t>(wc.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(),
                                dc.const_data_ptr<scalar_t>(), didx.const_data_ptr<int64_t>(),
                                out.mutable_data_ptr<scalar_t>(), N, H);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> embedding_gather_add_backward_cpu(const at::Tensor& grad, const at::Tensor& ids,
                                                                     const at::Tensor& delta_index,
                                                                     int64_t num_weight_rows, int64_t num_delta_rows,
                                                                     int64_t padding_idx, bool need_weight_grad,
                                                                     bool need_delta_grad) {
  check_gather_add_backward_args(grad, ids, delta_index, num_weight_rows, num_delta_rows, padding_idx);
  const int64_t H = grad.size(-1);
  const int64_t N = ids.numel();
  const at::Tensor g = grad.contiguous();
  at::Tensor gw = at::empty({0}, grad.options());
  at::Tensor gd = at::empty({0}, grad.options());
  if (need_weight_grad) {
    const at::Tensor idx = as_long_index(ids);
    check_index_range(idx, num_weight_rows, "embedding_gather_add_backward", "ids", "the weight gradient");
    gw = at::empty({num_weight_rows, H}, grad.options());
    if (gw.numel() > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "fastvat_gather_add_bwd_w", [&] {
        segment_sum_kernel<scalar_t>(g.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), N, H,
                                     num_weight_rows, padding_idx, gw.mutable_data_ptr<scalar_t>());
      });
    }
  }
  if (need_delta_grad) {
    const at::Tensor didx = as_long_index(delta_index);
    check_index_range(didx, num_delta_rows, "embedding_gather_add_backward", "delta_index", "the delta gradient");
    gd = at::empty({num_delta_rows, H}, grad.options());
    if (gd.numel() > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "fastvat_gather_add_bwd_d", [&] {
        segment_sum_kernel<scalar_t>(g.const_data_ptr<scalar_t>(), didx.const_data_ptr<int64_t>(), N, H,
                                     num_delta_rows, -1, gd.mutable_data_ptr<scalar_t>());
      });
    }
  }
  return {gw, gd};
}

}  // namespace
}  // namespace cpu
}  // namespace fastvat

TORCH_LIBRARY_IMPL(fastvat, CPU, m) {
  m.impl("embedding_gather_add", &fastvat::cpu::embedding_gather_add_cpu);
  m.impl("embedding_gather_add_backward", &fastvat::cpu::embedding_gather_add_backward_cpu);
}
