// perturb_ on CUDA: new = scale * direction / ||direction|| (one global norm),
// weight += new - previous (previous = delta on entry when has_previous), delta = new.
//
// Kernel 1: one fp32 (fp64 for double) partial sum of squares of direction per block, and a robust
// partial (cuda_utils.cuh: Robust) that costs a second read of the block's chunk only where the
// plain sum is not trusted.
// Kernel 2: every block reduces all partials itself in a fixed order (deterministic, no host
// sync), the robust ones only when the plain total is not trusted, then updates its chunk of
// weight and delta; blocks and the tiles inside a block go in the reverse order of kernel 1 so the
// direction data read last is still in L2.
//
// Rounding follows fastvat.reference.perturb_: nd = D(acc(direction) * f) (l2_normalize's output
// in direction's dtype D), then new = W(nd) (the perturbation is stored in weight's dtype W; ops.perturb_
// widens a direction narrower than W first, so D(...) never rounds below W) and, with acc = opmath(W),
// one rounding to W of the weight:
//   with previous: weight = W(acc(weight) + (acc(new) - acc(previous)))
//   without:       weight = W(acc(weight) + acc(new))
//   delta = new
#include "common.h"
#include "cuda/cuda_utils.cuh"

#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace fastvat {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int64_t kChunkAlign = 8;  // chunk sizes are multiples of every VEC used here

template <typename D, int VEC>
__global__ void __launch_bounds__(kThreads) perturb_sumsq_kernel(const D* __restrict__ d, int64_t n, int64_t cs,
                                                                  acc_t<D>* __restrict__ ws, double* __restrict__ wr) {
  using A = acc_t<D>;
  constexpr int RK = Robust<A>::K;
  __shared__ A smem[32 * 2];
  __shared__ double rsmem[32 * RK];
  const int64_t a = static_cast<int64_t>(blockIdx.x) * cs;
  const int64_t e = imin(a + cs, n);
  const int64_t be = a + ((e - a) / VEC) * VEC;  // a is a multiple of VEC
  const int tid = threadIdx.x;
  // ss[1] = sum of |d|: tells an all-zero chunk (nothing to sum again) from one whose squares underflowed
  A ss[2] = {A(0), A(0)};
  constexpr int64_t step = static_cast<int64_t>(kThreads) * VEC;
  for (int64_t base = a + static_cast<int64_t>(tid) * VEC; base < be; base += step * kUnroll) {
    Pack<D, VEC> p[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * step;
      if (i < be) {
        p[u] = load_pack<D, VEC>(d + i);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) p[u].val[k] = static_cast<D>(0.0f);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const A v = static_cast<A>(p[u].val[k]);
        ss[0] += v * v;
        ss[1] += ::fabs(v);
      }
  }
  for (int64_t i = be + tid; i < e; i += kThreads) {
    const A v = static_cast<A>(d[i]);
    ss[0] += v * v;
    ss[1] += ::fabs(v);
  }
  block_reduce<SumOp>(ss, smem);
  // Block-uniform. The chunk is summed again when its sum overflowed (or holds an Inf), or is finite,
  // not zero and too small to trust; a NaN sum is kept (the factor is 0 whatever the rest).
  double rs[RK] = {};
  const bool overflow = ss[0] == std::numeric_limits<A>::infinity();
  const bool tiny = ss[1] != A(0) && ss[0] <= std::numeric_limits<A>::max() && !sumsq_trusted(ss[0], e - a);
  if (overflow || tiny) {
    for (int64_t i = a + tid; i < e; i += kThreads) Robust<A>::add(rs, static_cast<A>(d[i]));
    block_reduce<SumOp>(rs, rsmem);
  } else {
    Robust<A>::from_sum(rs, ss[0]);
  }
  if (tid == 0) {
    ws[blockIdx.x] = ss[0];
#pragma unroll
    for (int c = 0; c < RK; ++c) wr[static_cast<int64_t>(blockIdx.x) * RK + c] = rs[c];
  }
}

template <typename W, typename D>
struct Update {
  using AD = acc_t<D>;
  using AW = acc_t<W>;
  // One element: reads weight (and delta when has_prev), writes both.
  template <bool WIDE>
  __device__ __forceinline__ static void apply(W& w, W& delta, D dir, const Factor<AD>& fa, bool has_prev) {
    const D nd = static_cast<D>(fa.template apply<WIDE>(static_cast<AD>(dir)));
    const W nw = static_cast<W>(static_cast<AD>(nd));  // the stored perturbation, as the reference's .to(W)
    if (has_prev) {  // one rounding, as the CPU kernel and the reference
      w = static_cast<W>(static_cast<AW>(w) + (static_cast<AW>(nw) - static_cast<AW>(delta)));
    } else {
      w = static_cast<W>(static_cast<AW>(w) + static_cast<AW>(nw));
    }
    delta = nw;
  }
};

// Kernel 2's update of [a, e) (a a multiple of VEC).
template <bool WIDE, typename W, typename D, int VEC>
__device__ __forceinline__ void update_chunk(W* w, const D* d, W* delta, int64_t a, int64_t e,
                                             const Factor<acc_t<D>>& fa, bool has_prev) {
  const int64_t be = a + ((e - a) / VEC) * VEC;
  const int tid = threadIdx.x;
  for (int64_t i = be + tid; i < e; i += kThreads) {
    W wv = w[i];
    W dv = has_prev ? delta[i] : static_cast<W>(0.0f);
    Update<W, D>::template apply<WIDE>(wv, dv, d[i], fa, has_prev);
    w[i] = wv;
    delta[i] = dv;
  }
  constexpr int64_t step = static_cast<int64_t>(kThreads) * VEC;
  const int64_t nsteps = (be - a + step * kUnroll - 1) / (step * kUnroll);
  for (int64_t s = nsteps - 1; s >= 0; --s) {
    const int64_t base = a + s * step * kUnroll + static_cast<int64_t>(tid) * VEC;
    Pack<D, VEC> pd[kUnroll];
    Pack<W, VEC> pw[kUnroll];
    Pack<W, VEC> pp[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * step;
      if (i < be) {
        pd[u] = load_pack<D, VEC>(d + i);
        pw[u] = load_pack<W, VEC>(w + i);
        if (has_prev) pp[u] = load_pack<W, VEC>(delta + i);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * step;
      if (i < be) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          W dv = has_prev ? pp[u].val[k] : static_cast<W>(0.0f);
          Update<W, D>::template apply<WIDE>(pw[u].val[k], dv, pd[u].val[k], fa, has_prev);
          pp[u].val[k] = dv;
        }
        store_pack<W, VEC>(w + i, pw[u]);
        store_pack<W, VEC>(delta + i, pp[u]);
      }
    }
  }
}

template <typename W, typename D, int VEC>
__global__ void __launch_bounds__(kThreads)
    perturb_update_kernel(W* w, const D* d, W* delta, int64_t n, int64_t cs, const acc_t<D>* __restrict__ ws,
                          const double* __restrict__ wr, int64_t nparts, double scale, bool has_prev) {
  using AD = acc_t<D>;
  constexpr int RK = Robust<AD>::K;
  __shared__ AD smem[32];
  __shared__ double rsmem[32 * RK];
  const AD ss = block_sum_array(ws, nparts, smem);
  Factor<AD> fa;
  if (sumsq_trusted(ss, n)) {
    fa = factor_of_sumsq(ss, scale);
  } else {  // block-uniform
    double rs[RK];
    block_sum_array_k<RK>(wr, nparts, rs, rsmem);
    fa = factor_of_robust<AD>(rs, scale);
  }
  const int64_t blk = static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x;
  const int64_t a = blk * cs;
  const int64_t e = imin(a + cs, n);
  if (fa.wide) {
    update_chunk<true, W, D, VEC>(w, d, delta, a, e, fa, has_prev);
  } else {
    update_chunk<false, W, D, VEC>(w, d, delta, a, e, fa, has_prev);
  }
}

template <typename W, typename D, int VEC>
void launch_perturb(W* w, const D* d, W* delta, int64_t n, double scale, bool has_prev, const at::Tensor& dir,
                    int device) {
  using AD = acc_t<D>;
  const int sms = sm_count(device);
  static PerDevice occupancy_cache;  // per kernel (this instantiation) and device
  const int occupancy =
      occupancy_cache.get(device, [] { return blocks_per_sm(perturb_sumsq_kernel<D, VEC>, kThreads); });
  const int64_t target = static_cast<int64_t>(sms) * occupancy;
  int64_t nb = std::min<int64_t>(target, std::max<int64_t>(1, ceil_div(n, static_cast<int64_t>(kThreads) * 8)));
  const int64_t cs = round_up(ceil_div(n, nb), kChunkAlign);
  nb = ceil_div(n, cs);
  constexpr int RK = Robust<AD>::K;
  // one buffer: RK robust doubles per block, then one AD per block (a double's room each)
  auto work = at::empty({nb * (RK + 1)}, dir.options().dtype(at::kDouble));
  double* wr = work.data_ptr<double>();
  AD* ws = reinterpret_cast<AD*>(wr + nb * RK);
  auto stream = c10::cuda::getCurrentCUDAStream(device);
  FASTVAT_LAUNCH(static_cast<unsigned>(nb), kThreads, 0, stream, perturb_sumsq_kernel<D, VEC>)(d, n, cs, ws, wr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  FASTVAT_LAUNCH(static_cast<unsigned>(nb), kThreads, 0, stream, perturb_update_kernel<W, D, VEC>)(w, d, delta, n, cs, ws, wr,
                                                                                     nb, scale, has_prev);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename W, typename D>
void perturb_dispatch(at::Tensor& weight, const at::Tensor& dir, at::Tensor& delta, double scale, bool has_prev) {
  constexpr int VW = vec16<W>();
  constexpr int VD = vec16<D>();
  constexpr int VEC = VW < VD ? VW : VD;
  W* w = weight.data_ptr<W>();
  W* dl = delta.data_ptr<W>();
  const D* d = dir.data_ptr<D>();
  const int64_t n = weight.numel();
  const int device = weight.get_device();
  const bool aligned = is_aligned(w, VEC * sizeof(W)) && is_aligned(dl, VEC * sizeof(W)) &&
                       is_aligned(d, VEC * sizeof(D));
  if (aligned) {
    launch_perturb<W, D, VEC>(w, d, dl, n, scale, has_prev, dir, device);
  } else {
    launch_perturb<W, D, 1>(w, d, dl, n, scale, has_prev, dir, device);
  }
}

void perturb_cuda(at::Tensor& weight, const at::Tensor& direction_in, at::Tensor& delta, double scale,
                  bool has_previous) {
  TORCH_CHECK(weight.is_cuda(), "fastvat.perturb_: weight must be a CUDA tensor");
  check_perturb_args(weight, direction_in, delta, scale);
  c10::cuda::CUDAGuard guard(weight.device());
  if (weight.numel() == 0) return;
  // Read direction first (it may alias delta or weight).
  const at::Tensor dir = direction_in.contiguous();
  // The kernels work on contiguous memory; strided weight/delta are updated through copies (as on the CPU).
  at::Tensor w = weight.is_contiguous() ? weight : weight.contiguous();
  at::Tensor dl = delta.is_contiguous() ? delta : delta.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, w.scalar_type(), "fastvat_perturb_cuda_w", [&] {
        using W = scalar_t;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, dir.scalar_type(),
                                        "fastvat_perturb_cuda_d",
                                        [&] { perturb_dispatch<W, scalar_t>(w, dir, dl, scale, has_previous); });
      });
  if (!w.is_same(weight)) weight.copy_(w);
  if (!dl.is_same(delta)) delta.copy_(dl);
}

}  // namespace
}  // namespace cuda
}  // namespace fastvat

TORCH_LIBRARY_IMPL(fastvat, CUDA, m) { m.impl("perturb_", &fastvat::cuda::perturb_cuda); }
