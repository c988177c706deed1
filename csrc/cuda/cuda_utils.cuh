// Helpers shared by the fastvat CUDA kernels: vector packs, warp/block reductions, launch
// geometry. Only c10/cuda headers (ATen/cuda/CUDAContext.h pulls cuBLAS/cuSPARSE headers).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <limits>
#include <mutex>

namespace fastvat {
namespace cuda {

template <typename T>
using acc_t = at::opmath_type<T>;

// N elements of T loaded/stored as one aligned access (16 bytes when N * sizeof(T) == 16).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T val[N];
};

template <typename T>
constexpr int vec16() {
  return 16 / static_cast<int>(sizeof(T));
}

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

inline bool is_aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// One int per device index, computed by the first get() for that device (under a mutex; concurrent
// first callers wait) and then read with one acquire load. A compute() that throws leaves the entry
// unset, to be computed again. Meant as a function-local static, one per quantity (and kernel).
class PerDevice {
 public:
  template <typename F>
  int get(int device, F&& compute) {
    TORCH_CHECK(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS, "fastvat: CUDA device index ", device,
                " out of range");
    if (ready_[device].load(std::memory_order_acquire)) return value_[device];
    std::lock_guard<std::mutex> lock(mutex_);
    if (!ready_[device].load(std::memory_order_relaxed)) {
      value_[device] = compute();
      ready_[device].store(true, std::memory_order_release);
    }
    return value_[device];
  }

 private:
  std::mutex mutex_;
  std::atomic<bool> ready_[C10_COMPILE_TIME_MAX_GPUS] = {};
  int value_[C10_COMPILE_TIME_MAX_GPUS] = {};
};

// Multiprocessor count of a device, cached per device (cudaDeviceGetAttribute does not synchronize).
inline int sm_count(int device) {
  static PerDevice cache;
  return cache.get(device, [device] {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
    return v > 0 ? v : 1;
  });
}

// Resident blocks per multiprocessor of a kernel at a block size (at least 1), on the current
// device (callers cache it per device with a PerDevice, under the CUDAGuard of the op).
template <typename Kernel>
inline int blocks_per_sm(Kernel kernel, int threads, size_t smem = 0) {
  int v = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&v, kernel, threads, smem));
  return v > 0 ? v : 1;
}

// Index of the mask entry that covers element i: i / inner, with a multiply-shift division when
// everything fits in 31 bits (64-bit division is a long subroutine on the GPU).
struct MaskIndex {
  int64_t inner = 1;
  bool fast = false;
  at::cuda::detail::IntDivider<unsigned int> div;

  MaskIndex() : div(1u) {}
  MaskIndex(int64_t inner_, int64_t numel) : inner(inner_ > 0 ? inner_ : 1), div(1u) {
    fast = numel <= std::numeric_limits<int32_t>::max() && inner <= std::numeric_limits<int32_t>::max();
    if (fast) div = at::cuda::detail::IntDivider<unsigned int>(static_cast<unsigned int>(inner));
  }
  __device__ __forceinline__ int64_t operator()(int64_t i) const {
    return fast ? static_cast<int64_t>(div.div(static_cast<unsigned int>(i))) : i / inner;
  }
};

// ---------------------------------------------------------------------------------------------
// Reductions. Butterfly (xor) shuffles leave the identical value in every lane, and the block
// versions reduce the per-warp values in a fixed order, so every thread of a block gets the same
// bits and the result does not depend on timing.
// ---------------------------------------------------------------------------------------------
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    A w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
}

// K sums at once over the whole block; smem must hold 32 * K values. Every thread gets the result.
// blockDim.x must be a multiple of 32.
template <typename A, int K>
__device__ __forceinline__ void block_sum(A (&v)[K], A* smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
  __syncthreads();  // smem may still be read by a previous reduction
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) smem[k * 32 + warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(lane < nwarps ? smem[k * 32 + lane] : A(0));
}

template <typename A, int K>
__device__ __forceinline__ void block_max(A (&v)[K], A* smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_max(v[k]);
  __syncthreads();
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) smem[k * 32 + warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_max(lane < nwarps ? smem[k * 32 + lane] : -std::numeric_limits<A>::infinity());
}

template <typename A, int K>
__device__ __forceinline__ void warp_sum_k(A (&v)[K]) {
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
}

template <typename A, int K>
__device__ __forceinline__ void warp_max_k(A (&v)[K]) {
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_max(v[k]);
}

// Sum of a small array of partials (ws[0..n)) by the whole block, in a fixed order; every thread
// gets the result. Used by the second kernel of the two-kernel reductions.
template <typename A>
__device__ __forceinline__ A block_sum_array(const A* ws, int64_t n, A* smem) {
  A s[1] = {A(0)};
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s[0] += ws[i];
  block_sum<A, 1>(s, smem);
  return s[0];
}

// exp in the accumulation type. float uses expf (2 ulp over the whole range, one MUFU.EX2 plus a
// few FMAs for the range reduction), not __expf, whose error grows with |x| (the softmax tests
// compare gradients at about 1e-7 of their largest entry).
template <typename A>
__device__ __forceinline__ A fast_exp(A x) {
  return ::exp(x);
}
template <>
__device__ __forceinline__ float fast_exp<float>(float x) {
  return ::expf(x);
}

// scale / sqrt(ss), or 0 when ss is 0 (a zero group gives zeros, never NaN). Computed in double and
// rounded once to A, as the CPU kernels do: float(scale) / sqrtf(ss) rounds three times and can miss
// an exactly representable factor by an ulp (tests check 16-bit rounding ties bit for bit).
template <typename A>
__device__ __forceinline__ A norm_factor(A ss, double scale) {
  return ss > A(0) ? static_cast<A>(scale / ::sqrt(static_cast<double>(ss))) : A(0);
}

// [a, e) = head scalars [a, h), VEC-vectors [h, be), tail scalars [be, e); indices that are
// multiples of VEC are 16-byte aligned (the caller checked the base pointers).
struct Span {
  int64_t h, be;
};
template <int VEC>
__device__ __forceinline__ Span split_span(int64_t a, int64_t e) {
  int64_t h = ((a + VEC - 1) / VEC) * VEC;
  if (h > e) h = e;
  const int64_t be = h + ((e - h) / VEC) * VEC;
  return {h, be};
}

}  // namespace cuda
}  // namespace fastvat
