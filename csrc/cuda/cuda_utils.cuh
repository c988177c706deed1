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
#include <cfloat>
#include <cstdint>
#include <limits>
#include <mutex>

// Kernel launch and dynamic shared memory, spelled so that the kernels also build as plain C++
// against a CUDA emulator (FASTVAT_CUDA_EMU) for CPU-only correctness tests.
#ifdef FASTVAT_CUDA_EMU
#define FASTVAT_LAUNCH(grid, block, smem, stream, ...) ::fvemu::launch(__VA_ARGS__, grid, block, smem, stream)
#define FASTVAT_EXTERN_SHARED(T, name, align) FVEMU_EXTERN_SHARED(T, name, align)
#else
#define FASTVAT_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define FASTVAT_EXTERN_SHARED(T, name, align) extern __shared__ __align__(align) T name[]
#endif

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
// Reductions, templated on the operation (SumOp, MaxOp: identity() and combine(mine, other)).
// Butterfly (xor) shuffles leave the identical value in every lane, and the block version reduces
// the per-warp values in a fixed order, so every thread of a block gets the same bits and the result
// does not depend on timing.
// ---------------------------------------------------------------------------------------------
struct SumOp {
  template <typename A>
  __device__ __forceinline__ static A identity() {
    return A(0);
  }
  template <typename A>
  __device__ __forceinline__ static A combine(A mine, A other) {
    return mine + other;
  }
};

struct MaxOp {
  template <typename A>
  __device__ __forceinline__ static A identity() {
    return -std::numeric_limits<A>::infinity();
  }
  // Not for NaN inputs: a NaN `mine` is kept and a NaN `other` dropped, so the lanes of a butterfly
  // would disagree (the KL row maxima, its only use, are never NaN).
  template <typename A>
  __device__ __forceinline__ static A combine(A mine, A other) {
    return other > mine ? other : mine;
  }
};

// K reductions at once over a warp; every lane gets the results.
template <typename Op, typename A, int K>
__device__ __forceinline__ void warp_reduce(A (&v)[K]) {
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v[k] = Op::combine(v[k], __shfl_xor_sync(0xffffffffu, v[k], o));
  }
}

// K reductions at once over the whole block; smem must hold 32 * K values. Every thread gets the
// results. blockDim.x must be a multiple of 32.
template <typename Op, typename A, int K>
__device__ __forceinline__ void block_reduce(A (&v)[K], A* smem) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  warp_reduce<Op>(v);
  __syncthreads();  // smem may still be read by a previous reduction
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) smem[k * 32 + warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = lane < nwarps ? smem[k * 32 + lane] : Op::template identity<A>();
  warp_reduce<Op>(v);
}

// A reduction over a team of TEAM threads: one warp (TEAM == 32, smem unused) or the whole block.
template <int TEAM, typename Op, typename A, int K>
__device__ __forceinline__ void team_reduce(A (&v)[K], A* smem) {
  if constexpr (TEAM == 32) {
    warp_reduce<Op>(v);
  } else {
    block_reduce<Op>(v, smem);
  }
}

// Sum of a small array of partials (ws[0..n)) by the whole block, in a fixed order; every thread
// gets the result. Used by the second kernel of the two-kernel reductions.
template <typename A>
__device__ __forceinline__ A block_sum_array(const A* ws, int64_t n, A* smem) {
  A s[1] = {A(0)};
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s[0] += ws[i];
  block_reduce<SumOp>(s, smem);
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

// ---------------------------------------------------------------------------------------------
// L2 norm factors that hold over the whole range of the input type.
//
// The kernels sum squares in A (acc_t) first: one cheap pass, and on ordinary data the norm comes
// from that plain sum. It is trusted when it is finite and at least count * min<A> * 2^digits:
// squares that underflowed (each below min<A>) then change it by less than A's rounding. A group
// whose sum is not trusted (tiny or huge values, an all-zero group, NaN/Inf) is summed again by the
// Robust accumulator below, whose squares cannot under- or overflow. Either way the group's norm
// ends up as 2^k * sqrt(ss) with ss a moderate double.
// ---------------------------------------------------------------------------------------------
template <typename A>
__host__ __device__ __forceinline__ bool sumsq_trusted(A ss, int64_t count) {
  // min * 2^digits (epsilon is 2^(1 - digits))
  constexpr double floor_per_element =
      2.0 * static_cast<double>(std::numeric_limits<A>::min() / std::numeric_limits<A>::epsilon());
  return ss <= std::numeric_limits<A>::max() &&
         static_cast<double>(ss) >= static_cast<double>(count) * floor_per_element;
}

// Robust<A>: K double partial sums of squares, added component-wise across threads and blocks.
// float inputs: the square of any float is a normal double, so one plain double sum (K = 1).
// double inputs: Blue's three accumulators (as LAPACK's dnrm2): values above 2^486 are squared
// after scaling by 2^-538, values below 2^-511 after scaling by 2^537, the rest as they are; a value
// is routed by its own magnitude, so the sums are independent of order and merge by addition.
// NaN lands in the middle sum and +-Inf in the big one, which keeps a non-finite group non-finite.
template <typename A>
struct Robust;

template <>
struct Robust<float> {
  static constexpr int K = 1;
  __device__ __forceinline__ static void add(double (&s)[K], float v) {
    const double d = static_cast<double>(v);
    s[0] += d * d;
  }
  // A block's trusted float partial, as a robust partial.
  __device__ __forceinline__ static void from_sum(double (&s)[K], float ss) { s[0] = static_cast<double>(ss); }
  // norm = 2^k * sqrt(ss)
  __device__ __forceinline__ static void norm(const double (&s)[K], int& k, double& ss) {
    k = 0;
    ss = s[0];
  }
};

template <>
struct Robust<double> {
  static constexpr int K = 3;  // [0] small values (scaled by 2^537), [1] middle, [2] big (scaled by 2^-538)
  static constexpr double kSmall = 0x1p-511, kBig = 0x1p486, kUp = 0x1p537, kDown = 0x1p-538;
  __device__ __forceinline__ static void add(double (&s)[K], double v) {
    const double a = ::fabs(v);
    if (a > kBig) {
      const double t = v * kDown;
      s[2] += t * t;
    } else if (a < kSmall) {
      const double t = v * kUp;
      s[0] += t * t;
    } else {
      s[1] += v * v;
    }
  }
  __device__ __forceinline__ static void from_sum(double (&s)[K], double ss) {
    s[0] = 0.0;
    s[1] = 0.0;
    s[2] = 0.0;
    if (ss > kBig * kBig) {
      s[2] = ss * kDown * kDown;
    } else {
      s[1] = ss;
    }
  }
  __device__ __forceinline__ static void norm(const double (&s)[K], int& k, double& ss) {
    if (!(s[1] <= DBL_MAX) || !(s[2] <= DBL_MAX)) {  // a NaN or Inf in the group
      k = 0;
      ss = s[1] + s[2];
    } else if (s[2] > 0.0) {  // the small values are below 2^-997 of the big ones: negligible
      k = 538;
      ss = s[2] + s[1] * kDown * kDown;
    } else if (s[1] > 0.0) {  // s[1] >= 2^-1022: the small values' rounding is at most 2^-52 of it
      k = 0;
      ss = s[1] + s[0] / kUp / kUp;
    } else {
      k = -537;
      ss = s[0];
    }
  }
};

// out = v * f in A (the plain formula, which ordinary data takes) when f = scale / ||v|| is a normal A;
// otherwise out = ((v * p1) * p2) * g in double, with ||v|| = m 2^E (m in [1, 2)), p1 * p2 = 2^-E
// (two factors, each a normal double) and g = scale / m: neither g nor v * 2^-E (below 2) leaves
// double's range. That result is rounded to A, then to the output type, as on the CPU.
template <typename A>
struct Factor {
  A f = A(0);
  bool wide = false;
  double p1 = 1.0, p2 = 1.0, g = 0.0;

  template <bool WIDE>
  __device__ __forceinline__ A apply(A v) const {
    if constexpr (WIDE) {
      return static_cast<A>(static_cast<double>(v) * p1 * p2 * g);
    } else {
      return v * f;
    }
  }
};

// The factor of a group of norm 2^k * sqrt(ss). A zero group, a group with NaN/Inf (ss not finite)
// and scale = 0 get f = 0, so NaN/Inf positions give NaN and the others zeros.
template <typename A>
__device__ __forceinline__ Factor<A> factor_of_norm(int k, double ss, double scale) {
  Factor<A> fa;
  if (!(ss > 0.0) || !(ss <= DBL_MAX) || scale == 0.0) return fa;
  const double r = ::sqrt(ss);
  int er = 0;
  const double m2 = 2.0 * ::frexp(r, &er);  // r = m2 * 2^(er - 1), m2 in [1, 2)
  const int e = k + er - 1;                 // ||v|| = m2 * 2^e
  const double g = scale / m2;
  // k == 0 (a plain or middle-range sum): scale / sqrt(ss), as plain_factor computes it; ldexp(g, -e) is
  // the same double whenever that is normal
  const double f = k == 0 ? scale / r : ::ldexp(g, -e);
  const A fa_f = static_cast<A>(f);
  if (::isfinite(fa_f) && ::fabs(fa_f) >= std::numeric_limits<A>::min()) {
    fa.f = fa_f;
    return fa;
  }
  fa.wide = true;
  fa.g = g;
  fa.p1 = ::ldexp(1.0, -(e / 2));
  fa.p2 = ::ldexp(1.0, -(e - e / 2));
  return fa;
}

// The common case on its own, for kernels that hold the group in registers meanwhile: ss trusted and
// f = scale / sqrt(ss) a normal A (then factor_of_sumsq gives the same f). f is computed in double and
// rounded once to A, as on the CPU: float(scale) / sqrtf(ss) rounds three times and can miss an
// exactly representable factor by an ulp (16-bit rounding ties are tested bit for bit).
template <typename A>
__device__ __forceinline__ bool plain_factor(A ss, int64_t count, double scale, A& f) {
  if (!sumsq_trusted(ss, count)) return false;
  f = static_cast<A>(scale / ::sqrt(static_cast<double>(ss)));
  return ::isfinite(f) && ::fabs(f) >= std::numeric_limits<A>::min();
}

template <typename A>
__device__ __forceinline__ Factor<A> factor_of_sumsq(A ss, double scale) {
  return factor_of_norm<A>(0, static_cast<double>(ss), scale);
}

template <typename A>
__device__ __forceinline__ Factor<A> factor_of_robust(const double (&s)[Robust<A>::K], double scale) {
  int k = 0;
  double ss = 0.0;
  Robust<A>::norm(s, k, ss);
  return factor_of_norm<A>(k, ss, scale);
}

// Component-wise sum of n robust partials ws[i * K + c] by the whole block, in a fixed order; every
// thread gets the result.
template <int K>
__device__ __forceinline__ void block_sum_array_k(const double* ws, int64_t n, double (&out)[K], double* smem) {
#pragma unroll
  for (int c = 0; c < K; ++c) out[c] = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
#pragma unroll
    for (int c = 0; c < K; ++c) out[c] += ws[i * K + c];
  }
  block_reduce<SumOp>(out, smem);
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
