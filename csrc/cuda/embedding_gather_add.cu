// embedding_gather_add on CUDA: out[n] = weight[ids[n]] + delta[delta_index[n]], and its backward.
//
// Forward: threadIdx.x walks the hidden dim in 16-byte vectors, each thread handles kRows tokens
// with all their loads in flight before the adds.
//
// Backward (deterministic, no atomics, no host sync): the token indices are sorted (stable), so
// equal rows form segments. Kernel 1 cuts the sorted order into chunks of kChunk tokens; a block
// sums each segment piece of its chunk in fp32 (fp64 for double): a segment that lies inside the
// chunk is written to the output row directly, a piece that crosses a chunk edge goes to an fp32
// workspace (slot 0: the piece that started in an earlier chunk, slot 1: the piece that goes on
// into the next). Kernel 2: the chunk where a crossing segment starts adds its slot 1 and the
// slot 0 of each later chunk the segment covers, in order, and writes the row. Long segments
// (padding, frequent tokens) are thus split across many blocks. The dense weight gradient is a
// zero-filled [V, H] tensor with only the rows present written; padding_idx stays zero.
#include "common.h"
#include "cuda/cuda_utils.cuh"

#include <torch/library.h>

#include <algorithm>
#include <utility>

namespace fastvat {
namespace cuda {
namespace {

constexpr int kRows = 4;

template <typename T, typename I, int VEC>
__global__ void __launch_bounds__(256)
    gather_add_kernel(const T* __restrict__ w, const I* __restrict__ ids, const T* __restrict__ d,
                      const I* __restrict__ di, T* __restrict__ out, int64_t N, int64_t H, int64_t V, int64_t U) {
  using A = acc_t<T>;
  const int64_t Hv = H / VEC;
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y) * kRows;
  int64_t wr[kRows], dr[kRows];
  bool ok[kRows];
#pragma unroll
  for (int j = 0; j < kRows; ++j) {
    const int64_t n = row0 + j;
    ok[j] = false;
    wr[j] = 0;
    dr[j] = 0;
    if (n < N) {
      const int64_t id = static_cast<int64_t>(ids[n]);
      const int64_t x = static_cast<int64_t>(di[n]);
      ok[j] = id >= 0 && id < V && x >= 0 && x < U;  // as the CPU kernel: no negative indices
      CUDA_KERNEL_ASSERT(ok[j] && "fastvat.embedding_gather_add: index out of range");
      wr[j] = ok[j] ? id * H : 0;
      dr[j] = ok[j] ? x * H : 0;
    }
  }
  for (int64_t cv = threadIdx.x; cv < Hv; cv += blockDim.x) {
    const int64_t c = cv * VEC;
    Pack<T, VEC> pw[kRows], pd[kRows];
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
      if (ok[j]) {
        pw[j] = load_pack<T, VEC>(w + wr[j] + c);
        pd[j] = load_pack<T, VEC>(d + dr[j] + c);
      }
    }
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
      const int64_t n = row0 + j;
      if (n < N) {
        Pack<T, VEC> o;
#pragma unroll
        for (int k = 0; k < VEC; ++k)
          o.val[k] = ok[j] ? static_cast<T>(static_cast<A>(pw[j].val[k]) + static_cast<A>(pd[j].val[k]))
                           : static_cast<T>(0.0f);
        store_pack<T, VEC>(out + n * H + c, o);
      }
    }
  }
}

template <typename T, typename I, int VEC>
void launch_gather(const at::Tensor& weight, const at::Tensor& ids, const at::Tensor& delta, const at::Tensor& di,
                   at::Tensor& out, int64_t N, int64_t H) {
  const int64_t Hv = H / VEC;
  const int bx = static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, round_up(Hv, 32))));
  const int by = std::max(1, 256 / bx);
  const int64_t blocks = ceil_div(N, static_cast<int64_t>(by) * kRows);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "fastvat.embedding_gather_add: too many tokens");
  auto stream = c10::cuda::getCurrentCUDAStream(weight.get_device());
  FASTVAT_LAUNCH(static_cast<unsigned>(blocks), dim3(bx, by), 0, stream, gather_add_kernel<T, I, VEC>)(
      weight.data_ptr<T>(), ids.data_ptr<I>(), delta.data_ptr<T>(), di.data_ptr<I>(), out.data_ptr<T>(), N, H,
      weight.size(0), delta.size(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename I>
void gather_dispatch(const at::Tensor& weight, const at::Tensor& ids, const at::Tensor& delta, const at::Tensor& di,
                     at::Tensor& out, int64_t N, int64_t H) {
  constexpr int VEC = vec16<T>();
  const bool aligned = H % VEC == 0 && is_aligned(weight.data_ptr(), 16) && is_aligned(delta.data_ptr(), 16) &&
                       is_aligned(out.data_ptr(), 16);
  if (aligned) {
    launch_gather<T, I, VEC>(weight, ids, delta, di, out, N, H);
  } else {
    launch_gather<T, I, 1>(weight, ids, delta, di, out, N, H);
  }
}

at::Tensor embedding_gather_add_cuda(const at::Tensor& weight_in, const at::Tensor& ids_in,
                                     const at::Tensor& delta_in, const at::Tensor& di_in, int64_t padding_idx) {
  // padding_idx only matters to the backward; it is range-checked here as on the CPU.
  TORCH_CHECK(weight_in.is_cuda(), "fastvat.embedding_gather_add: weight must be a CUDA tensor");
  check_gather_add_args(weight_in, ids_in, delta_in, di_in, padding_idx);
  c10::cuda::CUDAGuard guard(weight_in.device());
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor delta = delta_in.contiguous();
  at::Tensor ids = ids_in.contiguous();
  at::Tensor di = di_in.contiguous();
  if (ids.scalar_type() != di.scalar_type()) {
    ids = ids.to(at::kLong);
    di = di.to(at::kLong);
  }
  const int64_t H = weight.size(1);
  auto shape = ids.sizes().vec();
  shape.push_back(H);
  at::Tensor out = at::empty(shape, weight.options());
  const int64_t N = ids.numel();
  if (N == 0 || H == 0) return out;
  TORCH_CHECK(weight.size(0) > 0 && delta.size(0) > 0, "fastvat.embedding_gather_add: index into an empty table");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, weight.scalar_type(),
                                  "fastvat_embedding_gather_add_cuda", [&] {
                                    if (ids.scalar_type() == at::kLong) {
                                      gather_dispatch<scalar_t, int64_t>(weight, ids, delta, di, out, N, H);
                                    } else {
                                      gather_dispatch<scalar_t, int32_t>(weight, ids, delta, di, out, N, H);
                                    }
                                  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Backward: segment sums over sorted indices.
// ---------------------------------------------------------------------------------------------
constexpr int kChunk = 32;  // sorted tokens per block in kernel 1
constexpr int kSegUnroll = 4;

template <typename T, int VEC>
__global__ void __launch_bounds__(256)
    segsum_partial_kernel(const T* __restrict__ grad, const int64_t* __restrict__ keys,
                          const int64_t* __restrict__ perm, int64_t N, int64_t H, int64_t num_rows, int64_t skip_key,
                          T* __restrict__ out, acc_t<T>* __restrict__ ws) {
  using A = acc_t<T>;
  __shared__ int64_t skey[kChunk];
  __shared__ int64_t sperm[kChunk];
  const int64_t c = blockIdx.x;
  const int64_t a = c * kChunk;
  const int len = static_cast<int>(imin(static_cast<int64_t>(kChunk), N - a));
  for (int t = threadIdx.x; t < len; t += blockDim.x) {
    const int64_t k = keys[a + t];
    CUDA_KERNEL_ASSERT(k >= 0 && k < num_rows && "fastvat.embedding_gather_add_backward: index out of range");
    skey[t] = k;
    sperm[t] = perm[a + t];
  }
  const int64_t prev_key = a > 0 ? keys[a - 1] : int64_t(-1);
  const int64_t next_key = a + len < N ? keys[a + len] : int64_t(-1);
  __syncthreads();
  const int64_t Hv = H / VEC;
  for (int64_t cv = threadIdx.x; cv < Hv; cv += blockDim.x) {
    const int64_t col = cv * VEC;
    A acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = A(0);
    int piece_start = 0;
    for (int t0 = 0; t0 < len; t0 += kSegUnroll) {
      Pack<T, VEC> g[kSegUnroll];
#pragma unroll
      for (int u = 0; u < kSegUnroll; ++u) {
        if (t0 + u < len) g[u] = load_pack<T, VEC>(grad + sperm[t0 + u] * H + col);
      }
#pragma unroll
      for (int u = 0; u < kSegUnroll; ++u) {
        const int t = t0 + u;
        if (t < len) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] += static_cast<A>(g[u].val[k]);
          const int64_t key = skey[t];
          const bool last = t == len - 1;
          if (last || skey[t + 1] != key) {  // the piece [piece_start, t] ends here
            const bool before = piece_start == 0 && prev_key == key;
            const bool after = last && next_key == key;
            if (!before && !after) {
              if (key != skip_key && key >= 0 && key < num_rows) {
                Pack<T, VEC> o;
#pragma unroll
                for (int k = 0; k < VEC; ++k) o.val[k] = static_cast<T>(acc[k]);
                store_pack<T, VEC>(out + key * H + col, o);
              }
            } else {
              A* dst = ws + (c * 2 + (before ? 0 : 1)) * H + col;
#pragma unroll
              for (int k = 0; k < VEC; ++k) dst[k] = acc[k];
            }
#pragma unroll
            for (int k = 0; k < VEC; ++k) acc[k] = A(0);
            piece_start = t + 1;
          }
        }
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(256)
    segsum_combine_kernel(const int64_t* __restrict__ keys, int64_t N, int64_t H, int64_t num_rows, int64_t skip_key,
                          const acc_t<T>* __restrict__ ws, T* __restrict__ out) {
  using A = acc_t<T>;
  const int64_t c = blockIdx.x;
  const int64_t a = c * kChunk;
  const int64_t b = imin(a + kChunk, N);
  if (b >= N) return;
  const int64_t key = keys[b - 1];
  if (keys[b] != key) return;                                        // no segment crosses the chunk's end
  if (a > 0 && keys[a - 1] == key && keys[a] == key) return;          // it started in an earlier chunk
  if (key == skip_key || key < 0 || key >= num_rows) return;         // padding: its row stays zero
  // The segment's end: the first index >= b whose key differs (keys are sorted, keys[b] == key).
  // A binary search, not a walk over the chunks: a long segment (a frequent token) costs log N loads.
  int64_t lo = b + 1, hi = N;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (keys[mid] == key) lo = mid + 1;
    else hi = mid;
  }
  const int64_t last = (lo - 1) / kChunk;                            // the chunk where the segment ends
  for (int64_t col = threadIdx.x; col < H; col += blockDim.x) {
    A s = ws[(c * 2 + 1) * H + col];
    for (int64_t d = c + 1; d <= last; ++d) s += ws[(d * 2) * H + col];
    out[key * H + col] = static_cast<T>(s);
  }
}

// Sum the rows of grad ([N, H]) into out ([num_rows, H], zero-filled) by key.
template <typename T>
void segment_sum(const at::Tensor& grad, const at::Tensor& keys_in, int64_t num_rows, int64_t skip_key,
                 at::Tensor& out) {
  using A = acc_t<T>;
  const int64_t N = grad.size(0);
  const int64_t H = grad.size(1);
  auto sorted = at::sort(keys_in, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor keys = std::get<0>(sorted).contiguous();
  const at::Tensor perm = std::get<1>(sorted).contiguous();
  const int64_t num_chunks = ceil_div(N, kChunk);
  TORCH_CHECK(num_chunks <= std::numeric_limits<int32_t>::max(), "fastvat.embedding_gather_add_backward: too many tokens");
  auto ws = at::empty({num_chunks * 2, H}, grad.options().dtype(at::toOpMathType(grad.scalar_type())));
  auto stream = c10::cuda::getCurrentCUDAStream(grad.get_device());
  constexpr int VEC = vec16<T>();
  const bool aligned = H % VEC == 0 && is_aligned(grad.data_ptr(), 16) && is_aligned(out.data_ptr(), 16);
  const int64_t Hv = aligned ? H / VEC : H;
  const int threads = static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, round_up(Hv, 32))));
  if (aligned) {
    FASTVAT_LAUNCH(static_cast<unsigned>(num_chunks), threads, 0, stream, segsum_partial_kernel<T, VEC>)(
        grad.data_ptr<T>(), keys.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), N, H, num_rows, skip_key,
        out.data_ptr<T>(), ws.data_ptr<A>());
  } else {
    FASTVAT_LAUNCH(static_cast<unsigned>(num_chunks), threads, 0, stream, segsum_partial_kernel<T, 1>)(
        grad.data_ptr<T>(), keys.data_ptr<int64_t>(), perm.data_ptr<int64_t>(), N, H, num_rows, skip_key,
        out.data_ptr<T>(), ws.data_ptr<A>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (num_chunks > 1) {
    const int cthreads = static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, round_up(H, 32))));
    FASTVAT_LAUNCH(static_cast<unsigned>(num_chunks), cthreads, 0, stream, segsum_combine_kernel<T>)(
        keys.data_ptr<int64_t>(), N, H, num_rows, skip_key, ws.data_ptr<A>(), out.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor> embedding_gather_add_backward_cuda(const at::Tensor& grad_in, const at::Tensor& ids,
                                                                      const at::Tensor& di, int64_t num_weight_rows,
                                                                      int64_t num_delta_rows, int64_t padding_idx,
                                                                      bool need_weight_grad, bool need_delta_grad) {
  TORCH_CHECK(grad_in.is_cuda(), "fastvat.embedding_gather_add_backward: grad must be a CUDA tensor");
  check_gather_add_backward_args(grad_in, ids, di, num_weight_rows, num_delta_rows, padding_idx);
  c10::cuda::CUDAGuard guard(grad_in.device());
  const int64_t H = grad_in.size(-1);
  const int64_t N = ids.numel();
  const at::Tensor grad = grad_in.contiguous().view({N, H});
  at::Tensor gw = need_weight_grad ? at::zeros({num_weight_rows, H}, grad.options()) : at::empty({0}, grad.options());
  at::Tensor gd = need_delta_grad ? at::zeros({num_delta_rows, H}, grad.options()) : at::empty({0}, grad.options());
  if (N == 0 || H == 0) return std::make_tuple(gw, gd);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, grad.scalar_type(), "fastvat_embedding_gather_add_backward_cuda",
      [&] {
        if (need_weight_grad) {
          const at::Tensor keys = ids.reshape({N}).to(at::kLong);
          segment_sum<scalar_t>(grad, keys, num_weight_rows, padding_idx >= 0 ? padding_idx : int64_t(-1), gw);
        }
        if (need_delta_grad) {
          const at::Tensor keys = di.reshape({N}).to(at::kLong);
          segment_sum<scalar_t>(grad, keys, num_delta_rows, int64_t(-1), gd);
        }
      });
  return std::make_tuple(gw, gd);
}

}  // namespace
}  // namespace cuda
}  // namespace fastvat

TORCH_LIBRARY_IMPL(fastvat, CUDA, m) {
  m.impl("embedding_gather_add", &fastvat::cuda::embedding_gather_add_cuda);
  m.impl("embedding_gather_add_backward", &fastvat::cuda::embedding_gather_add_backward_cuda);
}
