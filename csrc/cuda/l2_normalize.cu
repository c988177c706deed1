// l2_normalize on CUDA: out = scale * v / ||v|| per group, v = (x - baseline) * mask.
//
// Two strategies:
//  * rows (token mode, small sample groups): one warp or one block per group; the group's values
//    stay in registers between the sum of squares and the scaling, so x is read once.
//  * chunks (global norm, big groups, or unaligned data): kernel 1 writes one fp32 (fp64 for
//    double) partial sum of squares per (group, chunk), and a robust partial (cuda_utils.cuh:
//    Robust) that costs a second read of the chunk only where the plain sum is not trusted; kernel 2
//    has every block reduce its group's partials itself in a fixed order (deterministic, no host
//    sync, no extra launch), the robust ones only when the group's plain sum is not trusted, and
//    scale its chunk, walking the chunks in the reverse order so that the data kernel 1 read last
//    is still in L2.
// Sums that are trusted give the same bits as a plain sum of squares in A; see cuda_utils.cuh.
#include "common.h"
#include "cuda/cuda_utils.cuh"

#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>

namespace fastvat {
namespace cuda {
namespace {

// How the mask applies to the values of v.
enum class MaskMode {
  kNone,        // no mask (or one applied per group by the rows kernel: row_mask)
  kPerVector,   // one mask entry per VEC-vector: inner is a multiple of VEC
  kPerElement,  // a mask entry per element
};

// Where the values of v come from.
template <typename T, int VEC>
struct L2Src {
  using A = acc_t<T>;
  const T* __restrict__ x;
  const T* __restrict__ b;  // nullptr: no baseline
  const T* __restrict__ m;  // nullptr: no mask
  MaskIndex mi;
  MaskMode mmode;

  // v for the VEC elements starting at i (i a multiple of VEC, so the access is aligned).
  __device__ __forceinline__ void load_vec(int64_t i, A (&v)[VEC]) const {
    const auto px = load_pack<T, VEC>(x + i);
    if (b != nullptr) {
      const auto pb = load_pack<T, VEC>(b + i);
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] = static_cast<A>(px.val[k]) - static_cast<A>(pb.val[k]);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] = static_cast<A>(px.val[k]);
    }
    if (mmode == MaskMode::kPerVector) {
      const A mm = static_cast<A>(m[mi(i)]);
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] *= mm;
    } else if (mmode == MaskMode::kPerElement) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] *= static_cast<A>(m[mi(i + k)]);
    }
  }

  __device__ __forceinline__ A load1(int64_t i) const {
    A v = static_cast<A>(x[i]);
    if (b != nullptr) v -= static_cast<A>(b[i]);
    if (mmode != MaskMode::kNone) v *= static_cast<A>(m[mi(i)]);
    return v;
  }
};

template <typename T, int VEC>
__device__ __forceinline__ void store_scaled(T* out, int64_t i, const acc_t<T> (&v)[VEC], acc_t<T> f) {
  Pack<T, VEC> p;
#pragma unroll
  for (int k = 0; k < VEC; ++k) p.val[k] = static_cast<T>(v[k] * f);
  store_pack<T, VEC>(out + i, p);
}

template <bool WIDE, typename T, int VEC>
__device__ __forceinline__ void store_scaled(T* out, int64_t i, const acc_t<T> (&v)[VEC], const Factor<acc_t<T>>& fa) {
  Pack<T, VEC> p;
#pragma unroll
  for (int k = 0; k < VEC; ++k) p.val[k] = static_cast<T>(fa.template apply<WIDE>(v[k]));
  store_pack<T, VEC>(out + i, p);
}

// ------------------------------------------------------------------------------------------
// Row kernels: TEAM threads per group (32: a warp, 8 groups per block; else the whole block),
// VPT cached VEC-vectors per thread. Needs G / VEC <= TEAM * VPT.
// ------------------------------------------------------------------------------------------
// The rows kernel's rare cases (sum not trusted, or a factor that is no normal A): the group is read
// again (from cache) rather than kept in registers, and out of line, so that none of this weighs on
// the registers of the common path. Team-uniform: every thread holds the same ss.
template <typename T, int VEC, int TEAM>
__device__ __noinline__ void l2_row_rare(L2Src<T, VEC> src, T* __restrict__ out, int64_t a, int64_t e, int tid,
                                        acc_t<T> mm, acc_t<T> ss, int64_t G, double scale, double* rsmem) {
  using A = acc_t<T>;
  constexpr int RK = Robust<A>::K;
  Factor<A> fa;
  if (sumsq_trusted(ss, G)) {
    fa = factor_of_sumsq(ss, scale);
  } else {
    double rs[RK] = {};
#pragma unroll 1
    for (int64_t i = a + tid; i < e; i += TEAM) Robust<A>::add(rs, src.load1(i) * mm);
    team_reduce<TEAM, SumOp>(rs, rsmem);
    fa = factor_of_robust<A>(rs, scale);
  }
  if (fa.wide) {
#pragma unroll 1
    for (int64_t i = a + tid; i < e; i += TEAM) out[i] = static_cast<T>(fa.template apply<true>(src.load1(i) * mm));
  } else {
#pragma unroll 1
    for (int64_t i = a + tid; i < e; i += TEAM) out[i] = static_cast<T>(fa.template apply<false>(src.load1(i) * mm));
  }
}

// Rows kernels that cache at most 32 values per thread fit 64 registers (1024 threads per SM); they
// are held to that so that the rare path (l2_row_rare, whose registers count for the kernel too)
// does not cost them occupancy.
template <int VALUES, int THREADS>
constexpr int l2_rows_min_blocks() {
  return VALUES <= 32 ? 1024 / THREADS : 1;
}

template <typename T, int VEC, int TEAM, int VPT, int THREADS>
__global__ void __launch_bounds__(THREADS, (l2_rows_min_blocks<VPT * VEC, THREADS>()))
    l2_rows_kernel(L2Src<T, VEC> src, T* __restrict__ out, int64_t R, int64_t G, double scale, bool row_mask) {
  using A = acc_t<T>;
  constexpr int RK = Robust<A>::K;
  __shared__ A smem[32];
  __shared__ double rsmem[32 * RK];
  const int tid = TEAM == 32 ? static_cast<int>(threadIdx.x & 31) : static_cast<int>(threadIdx.x);
  const int64_t r = TEAM == 32 ? static_cast<int64_t>(blockIdx.x) * (THREADS / 32) + (threadIdx.x >> 5)
                               : static_cast<int64_t>(blockIdx.x);
  if (r >= R) return;  // whole warp (TEAM 32) or whole block: no reduction is left waiting
  const int64_t a = r * G;
  const int64_t e = a + G;
  const Span sp = split_span<VEC>(a, e);
  const int64_t nb = (sp.be - sp.h) / VEC;
  const int head = static_cast<int>(sp.h - a);
  const int tail = static_cast<int>(e - sp.be);

  A mm = A(1);
  if (row_mask) {
    mm = static_cast<A>(src.m[src.mi(a)]);
    if (mm == A(0)) {  // a masked-out group: zeros, and no need to read x
      Pack<T, VEC> z;
#pragma unroll
      for (int k = 0; k < VEC; ++k) z.val[k] = static_cast<T>(0.0f);
      for (int64_t k = tid; k < nb; k += TEAM) store_pack<T, VEC>(out + sp.h + k * VEC, z);
      if (tid < head) out[a + tid] = static_cast<T>(0.0f);
      if (tid < tail) out[sp.be + tid] = static_cast<T>(0.0f);
      return;
    }
  }

  A v[VPT][VEC];
#pragma unroll
  for (int s = 0; s < VPT; ++s) {
    const int64_t k = tid + static_cast<int64_t>(s) * TEAM;
    if (k < nb) {
      src.load_vec(sp.h + k * VEC, v[s]);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[s][j] = A(0);
    }
  }
  A hv = tid < head ? src.load1(a + tid) : A(0);
  A tv = tid < tail ? src.load1(sp.be + tid) : A(0);
  if (row_mask) {
#pragma unroll
    for (int s = 0; s < VPT; ++s)
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[s][j] *= mm;
    hv *= mm;
    tv *= mm;
  }
  A ss[1] = {hv * hv + tv * tv};
#pragma unroll
  for (int s = 0; s < VPT; ++s)
#pragma unroll
    for (int j = 0; j < VEC; ++j) ss[0] += v[s][j] * v[s][j];
  team_reduce<TEAM, SumOp>(ss, smem);
  A f;
  bool plain = plain_factor(ss[0], G, scale, f);
  if (!plain && ss[0] == A(0)) {
    // Team-uniform. An exactly zero group (zero tokens are common: padding) keeps the register path,
    // with f = 0; only squares that underflowed to 0 need the rare path.
    bool nonzero = hv != A(0) || tv != A(0);
#pragma unroll
    for (int s = 0; s < VPT; ++s)
#pragma unroll
      for (int j = 0; j < VEC; ++j) nonzero = nonzero || v[s][j] != A(0);
    if constexpr (TEAM == 32) {
      nonzero = __any_sync(0xffffffffu, nonzero);
    } else {
      nonzero = __syncthreads_or(nonzero) != 0;
    }
    if (!nonzero) {
      f = A(0);
      plain = true;
    }
  }
  if (plain) {
#pragma unroll
    for (int s = 0; s < VPT; ++s) {
      const int64_t k = tid + static_cast<int64_t>(s) * TEAM;
      if (k < nb) store_scaled<T, VEC>(out, sp.h + k * VEC, v[s], f);
    }
    if (tid < head) out[a + tid] = static_cast<T>(hv * f);
    if (tid < tail) out[sp.be + tid] = static_cast<T>(tv * f);
    return;
  }
  l2_row_rare<T, VEC, TEAM>(src, out, a, e, tid, mm, ss[0], G, scale, rsmem);
}

// ------------------------------------------------------------------------------------------
// Chunk kernels: block blk covers chunk j = blk % bpg of group g = blk / bpg, i.e. elements
// [g*G + j*cs, min(g*G + (j+1)*cs, (g+1)*G)).
// ------------------------------------------------------------------------------------------
constexpr int kChunkThreads = 256;
constexpr int kUnroll = 4;

template <typename T, int VEC>
__global__ void __launch_bounds__(kChunkThreads) l2_sumsq_kernel(L2Src<T, VEC> src, int64_t G, int64_t cs,
                                                                  int64_t bpg, acc_t<T>* __restrict__ ws,
                                                                  double* __restrict__ wr) {
  using A = acc_t<T>;
  constexpr int RK = Robust<A>::K;
  __shared__ A smem[32 * 2];
  __shared__ double rsmem[32 * RK];
  const int64_t blk = blockIdx.x;
  const int64_t g = blk / bpg;
  const int64_t j = blk - g * bpg;
  const int64_t a = g * G + j * cs;
  const int64_t e = imin(a + cs, (g + 1) * G);
  const Span sp = split_span<VEC>(a, e);
  const int tid = threadIdx.x;
  // ss[1] = sum of |v|: tells an all-zero chunk (nothing to sum again) from one whose squares underflowed
  A ss[2] = {A(0), A(0)};
  for (int64_t i = a + tid; i < sp.h; i += kChunkThreads) {
    const A v = src.load1(i);
    ss[0] += v * v;
    ss[1] += ::fabs(v);
  }
  for (int64_t i = sp.be + tid; i < e; i += kChunkThreads) {
    const A v = src.load1(i);
    ss[0] += v * v;
    ss[1] += ::fabs(v);
  }
  constexpr int64_t step = static_cast<int64_t>(kChunkThreads) * VEC;
  for (int64_t base = sp.h + static_cast<int64_t>(tid) * VEC; base < sp.be; base += step * kUnroll) {
    A v[kUnroll][VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * step;
      if (i < sp.be) {
        src.load_vec(i, v[u]);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[u][k] = A(0);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        ss[0] += v[u][k] * v[u][k];
        ss[1] += ::fabs(v[u][k]);
      }
  }
  block_reduce<SumOp>(ss, smem);
  // Block-uniform. The chunk is summed again when its sum overflowed (or holds an Inf), or is finite,
  // not zero and too small to trust; a NaN sum is kept (its group's factor is 0 whatever the rest).
  double rs[RK] = {};
  const bool overflow = ss[0] == std::numeric_limits<A>::infinity();
  const bool tiny = ss[1] != A(0) && ss[0] <= std::numeric_limits<A>::max() && !sumsq_trusted(ss[0], e - a);
  if (overflow || tiny) {
    for (int64_t i = a + tid; i < e; i += kChunkThreads) Robust<A>::add(rs, src.load1(i));
    block_reduce<SumOp>(rs, rsmem);
  } else {
    Robust<A>::from_sum(rs, ss[0]);
  }
  if (tid == 0) {
    ws[blk] = ss[0];
#pragma unroll
    for (int c = 0; c < RK; ++c) wr[blk * RK + c] = rs[c];
  }
}

template <bool WIDE, typename T, int VEC>
__device__ __forceinline__ void scale_chunk(const L2Src<T, VEC>& src, T* __restrict__ out, int64_t a, int64_t e,
                                            const Factor<acc_t<T>>& fa) {
  using A = acc_t<T>;
  const Span sp = split_span<VEC>(a, e);
  const int tid = threadIdx.x;
  for (int64_t i = sp.be + tid; i < e; i += kChunkThreads) {
    out[i] = static_cast<T>(fa.template apply<WIDE>(src.load1(i)));
  }
  constexpr int64_t step = static_cast<int64_t>(kChunkThreads) * VEC;
  const int64_t nsteps = (sp.be - sp.h + step * kUnroll - 1) / (step * kUnroll);
  for (int64_t s = nsteps - 1; s >= 0; --s) {  // last-read data first
    const int64_t base = sp.h + s * step * kUnroll + static_cast<int64_t>(tid) * VEC;
    A v[kUnroll][VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * step;
      if (i < sp.be) src.load_vec(i, v[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * step;
      if (i < sp.be) store_scaled<WIDE, T, VEC>(out, i, v[u], fa);
    }
  }
  for (int64_t i = a + tid; i < sp.h; i += kChunkThreads) {
    out[i] = static_cast<T>(fa.template apply<WIDE>(src.load1(i)));
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kChunkThreads) l2_scale_kernel(L2Src<T, VEC> src, T* __restrict__ out, int64_t G,
                                                                  int64_t cs, int64_t bpg,
                                                                  const acc_t<T>* __restrict__ ws,
                                                                  const double* __restrict__ wr, double scale) {
  using A = acc_t<T>;
  constexpr int RK = Robust<A>::K;
  __shared__ A smem[32];
  __shared__ double rsmem[32 * RK];
  const int64_t blk = static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x;  // reverse of kernel 1
  const int64_t g = blk / bpg;
  const int64_t j = blk - g * bpg;
  const A ss = block_sum_array(ws + g * bpg, bpg, smem);
  Factor<A> fa;
  if (sumsq_trusted(ss, G)) {
    fa = factor_of_sumsq(ss, scale);
  } else {  // block-uniform
    double rs[RK];
    block_sum_array_k<RK>(wr + g * bpg * RK, bpg, rs, rsmem);
    fa = factor_of_robust<A>(rs, scale);
  }
  const int64_t a = g * G + j * cs;
  const int64_t e = imin(a + cs, (g + 1) * G);
  if (fa.wide) {
    scale_chunk<true, T, VEC>(src, out, a, e, fa);
  } else {
    scale_chunk<false, T, VEC>(src, out, a, e, fa);
  }
}

template <typename T, int VEC>
void launch_chunks(const L2Src<T, VEC>& src, T* out, int64_t numel, int64_t G, double scale,
                   const at::Tensor& x, int device) {
  using A = acc_t<T>;
  constexpr int RK = Robust<A>::K;
  const int64_t R = numel / G;
  const int sms = sm_count(device);
  static PerDevice occupancy_cache;  // per kernel (this instantiation) and device
  const int occupancy =
      occupancy_cache.get(device, [] { return blocks_per_sm(l2_sumsq_kernel<T, VEC>, kChunkThreads); });
  const int64_t target = static_cast<int64_t>(sms) * occupancy;
  const int64_t min_chunk = static_cast<int64_t>(kChunkThreads) * VEC * kUnroll;
  int64_t bpg = std::max<int64_t>(1, ceil_div(target, R));
  bpg = std::min<int64_t>(bpg, std::max<int64_t>(1, ceil_div(G, min_chunk)));
  const int64_t cs = round_up(ceil_div(G, bpg), 8);
  bpg = ceil_div(G, cs);
  const int64_t blocks = R * bpg;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "fastvat.l2_normalize: tensor too large");
  // one buffer: RK robust doubles per block, then one A per block (a double's room each)
  auto work = at::empty({blocks * (RK + 1)}, x.options().dtype(at::kDouble));
  double* wr = work.data_ptr<double>();
  A* ws = reinterpret_cast<A*>(wr + blocks * RK);
  auto stream = c10::cuda::getCurrentCUDAStream(device);
  FASTVAT_LAUNCH(static_cast<unsigned>(blocks), kChunkThreads, 0, stream, l2_sumsq_kernel<T, VEC>)(src, G, cs, bpg, ws, wr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  FASTVAT_LAUNCH(static_cast<unsigned>(blocks), kChunkThreads, 0, stream, l2_scale_kernel<T, VEC>)(src, out, G, cs, bpg, ws, wr,
                                                                                     scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC, int TEAM, int VPT, int THREADS>
void launch_rows(const L2Src<T, VEC>& src, T* out, int64_t R, int64_t G, double scale, bool row_mask, int device) {
  const int64_t rows_per_block = TEAM == 32 ? THREADS / 32 : 1;
  const int64_t blocks = ceil_div(R, rows_per_block);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "fastvat.l2_normalize: too many groups");
  auto stream = c10::cuda::getCurrentCUDAStream(device);
  FASTVAT_LAUNCH(static_cast<unsigned>(blocks), THREADS, 0, stream, l2_rows_kernel<T, VEC, TEAM, VPT, THREADS>)(
      src, out, R, G, scale, row_mask);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void l2_dispatch(const at::Tensor& x, const at::Tensor& b, const at::Tensor& m, int64_t inner, at::Tensor& out,
                 int64_t G, double scale) {
  constexpr int VEC = vec16<T>();
  const int device = x.get_device();
  const int64_t numel = x.numel();
  const int64_t R = numel / G;
  const T* xp = x.data_ptr<T>();
  const T* bp = b.defined() ? b.data_ptr<T>() : nullptr;
  const T* mp = m.defined() ? m.data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  const bool aligned = is_aligned(xp, 16) && is_aligned(op, 16) && (bp == nullptr || is_aligned(bp, 16));
  const MaskIndex mi(inner, numel);

  if (aligned) {
    const MaskMode mode = mp == nullptr       ? MaskMode::kNone
                          : inner % VEC == 0 ? MaskMode::kPerVector
                                             : MaskMode::kPerElement;
    L2Src<T, VEC> src{xp, bp, mp, mi, mode};
    const int64_t nvec = G / VEC;  // upper bound of the vectors in one group
    const int sms = sm_count(device);
    const bool many_rows = R >= sms || numel <= (int64_t(1) << 18);
    if (many_rows && nvec <= 512 * 8) {
      // Mask constant over each group: read it once per group, and skip masked groups entirely.
      const bool row_mask = mp != nullptr && inner % G == 0;
      L2Src<T, VEC> rsrc = src;
      if (row_mask) rsrc.mmode = MaskMode::kNone;
      if (nvec <= 32 * 4) return launch_rows<T, VEC, 32, 4, 256>(rsrc, op, R, G, scale, row_mask, device);
      if (nvec <= 32 * 8) return launch_rows<T, VEC, 32, 8, 256>(rsrc, op, R, G, scale, row_mask, device);
      if (nvec <= 512 * 4) return launch_rows<T, VEC, 512, 4, 512>(rsrc, op, R, G, scale, row_mask, device);
      return launch_rows<T, VEC, 512, 8, 512>(rsrc, op, R, G, scale, row_mask, device);
    }
    return launch_chunks<T, VEC>(src, op, numel, G, scale, x, device);
  }
  L2Src<T, 1> src{xp, bp, mp, mi, mp == nullptr ? MaskMode::kNone : MaskMode::kPerVector};
  launch_chunks<T, 1>(src, op, numel, G, scale, x, device);
}

at::Tensor l2_normalize_cuda(const at::Tensor& x_in, const std::optional<at::Tensor>& baseline,
                             const std::optional<at::Tensor>& mask, double scale, c10::string_view norm_sv) {
  TORCH_CHECK(x_in.is_cuda(), "fastvat.l2_normalize: x must be a CUDA tensor");
  check_l2_args(x_in, baseline, scale);
  const std::string norm(norm_sv.data(), norm_sv.size());
  c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t G = norm_group_length(x, norm);
  at::Tensor b;
  if (baseline.has_value() && baseline->defined()) b = baseline->contiguous();
  const int64_t inner = mask_inner(x, mask);
  at::Tensor m;
  if (mask.has_value() && mask->defined() && mask->numel() > 0) m = mask->contiguous();
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0 || G == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, x.scalar_type(),
                                  "fastvat_l2_normalize_cuda",
                                  [&] { l2_dispatch<scalar_t>(x, b, m, inner, out, G, scale); });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace fastvat

TORCH_LIBRARY_IMPL(fastvat, CUDA, m) { m.impl("l2_normalize", &fastvat::cuda::l2_normalize_cuda); }
