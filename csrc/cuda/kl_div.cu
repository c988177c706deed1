// kl_div_with_logits on CUDA: per row of [N, C] logits,
//   loss = KL(softmax(p) || softmax(q)) (times mask), grad = (softmax(q) - softmax(p)) (times mask).
//
// One team per row: a warp for small C (8 rows per block), else a whole block. Pass 1 reads the
// row once and keeps online-softmax statistics (max, Σe^{x-max}) for p and q plus
// S = Σ e^{p-mp}((p - mp) - (q - mq)), moved along with the running maxima. Every term is taken
// relative to the maxima because softmax is shift-invariant: p - q of offset rows (p + a, q - a)
// would carry 2a into each term and cancel it only at the end, losing digits with the offset.
// Pass 2 (when the gradient is wanted, or when the row is cached in registers) computes softmax(p),
// softmax(q), writes the gradient and accumulates the loss as Σ softmax(p)·((p - mp) - (q - mq) - c),
// c = log Zp - log Zq — each term is small when p ≈ q, so the loss keeps its relative accuracy even
// for tiny KL (the VAT regime). Without pass 2, loss = S/Zp - c.
//
// Rows up to 2048 16-byte vectors (fp32 C <= 8192, bf16 C <= 16384) stay on chip between the
// passes (p in registers, q in shared memory); longer rows are read again in pass 2, backwards,
// by one 1024-thread block per multiprocessor so that most of the row is still in L2. The two are
// separate kernels (kl_rows_cached_kernel, kl_rows_streamed_kernel) sharing the row prologue and
// epilogue. Other kernel choices exist for benchmarks only, through the op
// _kl_div_with_logits_variant (see KlVariant).
// Masked rows (mask == 0) are not read.
//
// Small KLs (nearby distributions: the usual formula's rounding, an ulp of each log-sum-exp, is as
// large as a KL of 1e-7 in float and can make it negative) and rows whose float statistics overflow
// take one more pass in double before pass 2 (KlPrecise): with the row maxima as fixed shifts,
// t = (p - mp) - (q - mq) is an exact difference and KL = A/Zp + log1p(D/Zp), A = Σe^{p-mp}t,
// D = Zq - Zp summed as e^{p-mp}·expm1(-t); pass 2 then writes softmax(q) - softmax(p) as
// softmax(p)·expm1(-t - log1p(D/Zp)), exactly 0 where p = q. Same math as the CPU kernel's KLPrecise.
#include "common.h"
#include "cuda/cuda_utils.cuh"

#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <string>
#include <type_traits>

namespace fastvat {
namespace cuda {
namespace {

template <typename A>
struct Online {
  A mp, zp, sp, mq, zq;
  __device__ __forceinline__ void init() {
    mp = -std::numeric_limits<A>::infinity();
    mq = -std::numeric_limits<A>::infinity();
    zp = sp = zq = A(0);
  }
  template <int VEC>
  __device__ __forceinline__ void add(const A (&pv)[VEC], const A (&qv)[VEC]) {
    constexpr A ninf = -std::numeric_limits<A>::infinity();
    A vp = pv[0], vq = qv[0];
#pragma unroll
    for (int k = 1; k < VEC; ++k) {
      vp = pv[k] > vp ? pv[k] : vp;
      vq = qv[k] > vq ? qv[k] : vq;
    }
    // S moves with the maxima: each term loses the rise of mp and gains the rise of mq. While
    // Zp = 0, S is 0 and a maximum may still be -inf, so nothing moves. A rise that underflows every
    // earlier weight (c = 0) takes S to 0 with Zp, as pass 2 drops terms whose softmax(p) is 0; an
    // S of +inf (q = -inf under such a term) would otherwise give inf * 0.
    if (vp > mp) {
      const A c = fast_exp(mp - vp);
      if (zp > A(0)) sp = c > A(0) ? (sp - (vp - mp) * zp) * c : A(0);
      zp *= c;
      mp = vp;
    }
    if (vq > mq) {
      if (zp > A(0)) sp += (vq - mq) * zp;
      zq *= fast_exp(mq - vq);
      mq = vq;
    }
    if (mp != ninf) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const A dp = pv[k] - mp;
        const A e = fast_exp(dp);
        zp += e;
        // 0·log 0 = 0, also for q = -inf; a q = -inf under p > 0 gives +inf, also while mq is -inf
        const A dq = qv[k] == ninf ? ninf : qv[k] - mq;
        sp += e > A(0) ? e * (dp - dq) : A(0);
      }
    } else {
      // Only -inf or NaN so far (a NaN is no maximum): the loop above did not run, so a NaN here
      // would be lost; it makes the row's loss and gradient NaN, as everywhere else.
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        if (pv[k] != pv[k]) zp = std::numeric_limits<A>::quiet_NaN();
      }
    }
    if (mq != ninf) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) zq += fast_exp(qv[k] - mq);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        if (qv[k] != qv[k]) zq = std::numeric_limits<A>::quiet_NaN();
      }
    }
  }
  __device__ __forceinline__ void add1(A p, A q) {
    const A pv[1] = {p};
    const A qv[1] = {q};
    add<1>(pv, qv);
  }
};

// Row statistics after the team reduction, and the per-element pass-2 math.
// A row whose p (or q) logits are all -inf has no softmax (0/0): its loss and gradient are NaN,
// as from the CPU kernel (and its loss as from reference.kl_rows); kl_init() starts such a row's
// loss at NaN, grad() gives NaN for its entries.
template <typename A>
struct Final {
  A mp, mq, inv_zp, inv_zq, zp, sp, c, mm;
  double cd;  // c in double, for the loss without pass 2
  bool pvalid, qvalid;
  // KlPrecise's results, for rows that take it: 1/Zp, 1/Zq, log1p(D/Zp) and the loss, in double
  bool precise;
  double pinv_zp, pinv_zq, pL, ploss;
  __device__ __forceinline__ A kl_init() const {
    return pvalid && qvalid ? A(0) : std::numeric_limits<A>::quiet_NaN();
  }
  // softmax(p), softmax(q) at one element; adds the element's KL term to kl (0 where softmax(p) is
  // 0, as 0 log 0 = 0; a NaN softmax(p), from a NaN in the row, stays NaN).
  __device__ __forceinline__ A grad(A p, A q, A& kl) const {
    constexpr A nan = std::numeric_limits<A>::quiet_NaN();
    const A dp = p - mp, dq = q - mq;
    const A ep = pvalid ? fast_exp(dp) * inv_zp : nan;
    const A eq = qvalid ? fast_exp(dq) * inv_zq : nan;
    kl += ep == A(0) ? A(0) : ep * ((dp - dq) - c);
    return (eq - ep) * mm;
  }
  // The gradient of a row that took KlPrecise (its loss is known): softmax(q) - softmax(p) = π·expm1(x),
  // x = (q - mq) - (p - mp) - L, without cancellation where p ≈ q; where |x| >= 1 the plain difference
  // has none either (and the expm1 form could overflow). Out of line, so that its double math does
  // not weigh on the registers of the ordinary rows' loop.
  __device__ __noinline__ A grad_precise(A p, A q) const {
    const double a = static_cast<double>(p) - static_cast<double>(mp);
    const double dq = static_cast<double>(q) - static_cast<double>(mq);
    const double x = dq - a - pL, pi = ::exp(a) * pinv_zp;
    const double g = ::fabs(x) < 1.0 ? pi * ::expm1(x) : ::exp(dq) * pinv_zq - pi;
    return static_cast<A>(g * static_cast<double>(mm));
  }
  // One element of pass 2: the precise row's gradient (PRECISE, the same for the whole row), or the
  // ordinary one with its KL term added to kl.
  template <bool PRECISE>
  __device__ __forceinline__ A grad2(A p, A q, A& kl) const {
    if constexpr (PRECISE) {
      return grad_precise(p, q);
    } else {
      return grad(p, q, kl);
    }
  }
  // The loss from pass 1's statistics alone (valid rows).
  __device__ __forceinline__ A pass1_loss() const {
    if (precise) return static_cast<A>(ploss * static_cast<double>(mm));
    return static_cast<A>((static_cast<double>(sp) / static_cast<double>(zp) - cd) * static_cast<double>(mm));
  }
  // The row's loss from pass 2's team sum of the KL terms (or KlPrecise's), times the mask.
  __device__ __forceinline__ A row_loss(A kl_sum) const {
    return (precise ? static_cast<A>(ploss) : kl_sum) * mm;
  }
};

// Exact-difference statistics in double of one thread's share of a row, the row maxima as fixed shifts:
//   a = p - mp, t = a - (q - mq), e = e^a;  Zp = Σe, A = Σe·t, D = Σ(e^{q-mq} - e) = Zq - Zp,
// D's terms as e·expm1(-t) where |t| < 1. A term of p = -inf (e = 0) adds nothing to A; a q = -inf
// under e > 0 makes A, and the KL, +inf.
struct KlPrecise {
  double zp, a, d;
  __device__ __forceinline__ void init() { zp = a = d = 0.0; }
  template <typename A>
  __device__ __noinline__ void add(A p, A q, A mp, A mq) {
    const double av = static_cast<double>(p) - static_cast<double>(mp);
    const double dq = static_cast<double>(q) - static_cast<double>(mq);
    const double t = av - dq, e = ::exp(av);
    zp += e;
    a += e == 0.0 ? 0.0 : e * t;
    d += ::fabs(t) < 1.0 ? e * ::expm1(-t) : ::exp(dq) - e;
  }
};

// Whether pass 1's float statistics give the row's KL to about 1e-4 relative: their rounding is an
// absolute error of a few ulp of A, so a smaller KL, or statistics that overflowed (S = inf for a KL
// that is finite in double) or are NaN, take KlPrecise.
template <typename A>
__device__ __forceinline__ bool kl_fast_ok(double loss) {
  constexpr double tau = std::is_same<A, double>::value ? 1e-9 : 1e-2;
  return loss > tau && loss < std::numeric_limits<double>::infinity();
}

// The team's KlPrecise sums into f (every thread of the team gets them).
template <int TEAM, typename A>
__device__ __forceinline__ void kl_set_precise(const KlPrecise& mine, Final<A>& f, double* dsmem) {
  double s[3] = {mine.zp, mine.a, mine.d};
  team_reduce<TEAM, SumOp>(s, dsmem);
  f.pL = ::log1p(s[2] / s[0]);
  f.pinv_zp = 1.0 / s[0];
  f.pinv_zq = 1.0 / (s[0] + s[2]);
  const double kl = s[1] / s[0] + f.pL;
  f.ploss = kl < 0.0 ? 0.0 : kl;  // never negative; NaN stays NaN
}

template <int TEAM, typename A>
__device__ __forceinline__ Final<A> finalize(const Online<A>& st, A mm, A* smem) {
  constexpr A ninf = -std::numeric_limits<A>::infinity();
  A mx[2] = {st.mp, st.mq};
  team_reduce<TEAM, MaxOp>(mx, smem);
  const A cp = st.mp == ninf ? A(0) : fast_exp(st.mp - mx[0]);
  const A cq = st.mq == ninf ? A(0) : fast_exp(st.mq - mx[1]);
  // each thread's S moved to the row's maxima (as in Online::add; nothing from a thread whose weights
  // all underflow there, cp = 0)
  const A sp =
      st.zp > A(0) && cp > A(0) ? (st.sp + ((mx[1] - st.mq) - (mx[0] - st.mp)) * st.zp) * cp : A(0);
  A s[3] = {st.zp * cp, sp, st.zq * cq};
  team_reduce<TEAM, SumOp>(s, smem);
  Final<A> f;
  f.mp = mx[0];
  f.mq = mx[1];
  f.zp = s[0];
  f.sp = s[1];
  f.inv_zp = A(1) / s[0];
  f.inv_zq = A(1) / s[2];
  f.pvalid = mx[0] != ninf;
  f.qvalid = mx[1] != ninf;
  // log(Zp / Zq) in double: log Zp - log Zq in A would carry an ulp of log Zp (which grows with C),
  // as large as the last digits a small KL needs
  f.cd = ::log(static_cast<double>(s[0]) / static_cast<double>(s[2]));
  f.c = static_cast<A>(f.cd);
  f.mm = mm;
  f.precise = f.pvalid && f.qvalid &&
              !kl_fast_ok<A>(static_cast<double>(f.sp) / static_cast<double>(f.zp) - f.cd);
  f.pinv_zp = f.pinv_zq = f.pL = f.ploss = 0.0;
  return f;
}

template <typename T, int VEC>
__device__ __forceinline__ void to_acc(const Pack<T, VEC>& p, acc_t<T> (&v)[VEC]) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) v[k] = static_cast<acc_t<T>>(p.val[k]);
}

// One team's row: the thread's index in the team, the row, and the row's split into head scalars
// [a, sp.h), nb VEC-vectors [sp.h, sp.be) and tail scalars [sp.be, a + C).
struct KlRow {
  int tid;
  int64_t r, a;
  Span sp;
  int64_t nb;
  int head, tail;
};

template <int VEC, int TEAM, int THREADS>
__device__ __forceinline__ KlRow kl_row(int64_t C) {
  KlRow row;
  row.tid = TEAM == 32 ? static_cast<int>(threadIdx.x & 31) : static_cast<int>(threadIdx.x);
  row.r = TEAM == 32 ? static_cast<int64_t>(blockIdx.x) * (THREADS / 32) + (threadIdx.x >> 5)
                     : static_cast<int64_t>(blockIdx.x);
  row.a = row.r * C;
  const int64_t e = row.a + C;
  row.sp = split_span<VEC>(row.a, e);
  row.nb = (row.sp.be - row.sp.h) / VEC;
  row.head = static_cast<int>(row.sp.h - row.a);
  row.tail = static_cast<int>(e - row.sp.be);
  return row;
}

// A masked row (mask == 0): zero loss and gradient, without reading the logits.
template <typename T, int VEC, int TEAM>
__device__ __forceinline__ void kl_zero_row(const KlRow& row, T* __restrict__ Gd, acc_t<T>* __restrict__ rows) {
  if (row.tid == 0) rows[row.r] = acc_t<T>(0);
  if (Gd != nullptr) {
    Pack<T, VEC> z;
#pragma unroll
    for (int k = 0; k < VEC; ++k) z.val[k] = static_cast<T>(0.0f);
    for (int64_t k = row.tid; k < row.nb; k += TEAM) store_pack<T, VEC>(Gd + row.sp.h + k * VEC, z);
    if (row.tid < row.head) Gd[row.a + row.tid] = static_cast<T>(0.0f);
    if (row.tid < row.tail) Gd[row.sp.be + row.tid] = static_cast<T>(0.0f);
  }
}

// This thread's head and tail scalars of the row (zeros where it has none); kept in registers
// for both passes.
template <typename A>
struct KlEdges {
  A hp, hq, tp, tq;
};

template <typename T>
__device__ __forceinline__ KlEdges<acc_t<T>> kl_load_edges(const KlRow& row, const T* __restrict__ P,
                                                           const T* __restrict__ Q) {
  using A = acc_t<T>;
  KlEdges<A> ed{A(0), A(0), A(0), A(0)};
  if (row.tid < row.head) {
    ed.hp = static_cast<A>(P[row.a + row.tid]);
    ed.hq = static_cast<A>(Q[row.a + row.tid]);
  }
  if (row.tid < row.tail) {
    ed.tp = static_cast<A>(P[row.sp.be + row.tid]);
    ed.tq = static_cast<A>(Q[row.sp.be + row.tid]);
  }
  return ed;
}

// Pass 1 of the head and tail scalars (after the vectors).
template <typename A>
__device__ __forceinline__ void kl_add_edges(const KlRow& row, const KlEdges<A>& ed, Online<A>& st) {
  if (row.tid < row.head) st.add1(ed.hp, ed.hq);
  if (row.tid < row.tail) st.add1(ed.tp, ed.tq);
}

template <typename A>
__device__ __forceinline__ void kl_precise_edges(const KlRow& row, const KlEdges<A>& ed, const Final<A>& f,
                                                 KlPrecise& pr) {
  if (row.tid < row.head) pr.add(ed.hp, ed.hq, f.mp, f.mq);
  if (row.tid < row.tail) pr.add(ed.tp, ed.tq, f.mp, f.mq);
}

// Pass 2 of the head and tail scalars (after the vectors), then the row's loss: the team's sum of
// the KL terms, times the mask.
template <int TEAM, typename T>
__device__ __forceinline__ void kl_finish_row(const KlRow& row, const KlEdges<acc_t<T>>& ed,
                                              const Final<acc_t<T>>& f, acc_t<T> (&kl)[1], T* __restrict__ Gd,
                                              acc_t<T>* __restrict__ rows, acc_t<T>* smem) {
  using A = acc_t<T>;
  if (row.tid < row.head) {
    const A g = f.precise ? f.grad_precise(ed.hp, ed.hq) : f.grad(ed.hp, ed.hq, kl[0]);
    if (Gd != nullptr) Gd[row.a + row.tid] = static_cast<T>(g);
  }
  if (row.tid < row.tail) {
    const A g = f.precise ? f.grad_precise(ed.tp, ed.tq) : f.grad(ed.tp, ed.tq, kl[0]);
    if (Gd != nullptr) Gd[row.sp.be + row.tid] = static_cast<T>(g);
  }
  team_reduce<TEAM, SumOp>(kl, smem);
  if (row.tid == 0) rows[row.r] = f.row_loss(kl[0]);
}

// Rows of at most TEAM * VPT vectors, held on chip between the passes: p's vectors in registers,
// q's in this thread's own slots of dynamic shared memory (both in registers would spill); no
// barrier needed, each thread reads back what it wrote. Pass 2 always runs (the loss comes from it).
template <typename T, int VEC, int TEAM, int VPT, int THREADS>
__global__ void __launch_bounds__(THREADS, 1)
    kl_rows_cached_kernel(const T* __restrict__ P, const T* __restrict__ Q, T* __restrict__ Gd,
                          const acc_t<T>* __restrict__ M, acc_t<T>* __restrict__ rows, int64_t N, int64_t C) {
  static_assert(VPT > 0, "a cached row needs at least one vector per thread");
  using A = acc_t<T>;
  __shared__ A smem[32 * 3];
  const KlRow row = kl_row<VEC, TEAM, THREADS>(C);
  if (row.r >= N) return;  // whole warp (TEAM 32) or whole block: no reduction is left waiting
  const A mm = M != nullptr ? M[row.r] : A(1);
  if (mm == A(0)) {
    kl_zero_row<T, VEC, TEAM>(row, Gd, rows);
    return;
  }
  const KlEdges<A> ed = kl_load_edges<T>(row, P, Q);

  FASTVAT_EXTERN_SHARED(unsigned char, kl_dyn_smem, 16);
  Pack<T, VEC>* cq = reinterpret_cast<Pack<T, VEC>*>(kl_dyn_smem) + threadIdx.x;
  Pack<T, VEC> cp[VPT];
#pragma unroll
  for (int s = 0; s < VPT; ++s) {
    const int64_t k = row.tid + static_cast<int64_t>(s) * TEAM;
    if (k < row.nb) {
      cp[s] = load_pack<T, VEC>(P + row.sp.h + k * VEC);
      cq[s * THREADS] = load_pack<T, VEC>(Q + row.sp.h + k * VEC);
    }
  }
  Online<A> st;
  st.init();
#pragma unroll
  for (int s = 0; s < VPT; ++s) {
    const int64_t k = row.tid + static_cast<int64_t>(s) * TEAM;
    if (k < row.nb) {
      A pv[VEC], qv[VEC];
      to_acc<T, VEC>(cp[s], pv);
      to_acc<T, VEC>(cq[s * THREADS], qv);
      st.template add<VEC>(pv, qv);
    }
  }
  kl_add_edges(row, ed, st);
  Final<A> f = finalize<TEAM, A>(st, mm, smem);
  if (f.precise) {  // the same for the whole team: its reductions stay together
    __shared__ double dsmem[32 * 3];
    KlPrecise pr;
    pr.init();
#pragma unroll
    for (int s = 0; s < VPT; ++s) {
      const int64_t k = row.tid + static_cast<int64_t>(s) * TEAM;
      if (k < row.nb) {
        A pv[VEC], qv[VEC];
        to_acc<T, VEC>(cp[s], pv);
        to_acc<T, VEC>(cq[s * THREADS], qv);
#pragma unroll
        for (int j = 0; j < VEC; ++j) pr.add(pv[j], qv[j], f.mp, f.mq);
      }
    }
    kl_precise_edges(row, ed, f, pr);
    kl_set_precise<TEAM>(pr, f, dsmem);
  }

  A kl[1] = {f.kl_init()};
  // one loop per kind of row, each with its own element math (the choice is the same for the team)
  auto pass2 = [&](auto precise) {
#pragma unroll
    for (int s = 0; s < VPT; ++s) {
      const int64_t k = row.tid + static_cast<int64_t>(s) * TEAM;
      if (k < row.nb) {
        A pv[VEC], qv[VEC];
        to_acc<T, VEC>(cp[s], pv);
        to_acc<T, VEC>(cq[s * THREADS], qv);
        Pack<T, VEC> g;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          g.val[j] = static_cast<T>(f.template grad2<decltype(precise)::value>(pv[j], qv[j], kl[0]));
        }
        if (Gd != nullptr) store_pack<T, VEC>(Gd + row.sp.h + k * VEC, g);
      }
    }
  };
  if (f.precise) {
    pass2(std::true_type{});
  } else {
    pass2(std::false_type{});
  }
  kl_finish_row<TEAM, T>(row, ed, f, kl, Gd, rows, smem);
}

// Two 512-thread streaming blocks per multiprocessor (registers capped at 64), else one.
template <int THREADS>
constexpr int kl_streamed_min_blocks() {
  return THREADS == 512 ? 2 : 1;
}

// Rows of any length, read from global memory in each pass. Without the gradient the loss comes
// from pass 1's statistics alone; with it, pass 2 walks the row backwards so that the vectors read
// last in pass 1 (most likely still in L2) are read first.
template <typename T, int VEC, int TEAM, int THREADS>
__global__ void __launch_bounds__(THREADS, (kl_streamed_min_blocks<THREADS>()))
    kl_rows_streamed_kernel(const T* __restrict__ P, const T* __restrict__ Q, T* __restrict__ Gd,
                            const acc_t<T>* __restrict__ M, acc_t<T>* __restrict__ rows, int64_t N, int64_t C) {
  using A = acc_t<T>;
  constexpr int U = 2;  // vectors per tensor in flight per thread
  constexpr int64_t step = TEAM;
  __shared__ A smem[32 * 3];
  const KlRow row = kl_row<VEC, TEAM, THREADS>(C);
  if (row.r >= N) return;  // whole warp (TEAM 32) or whole block: no reduction is left waiting
  const A mm = M != nullptr ? M[row.r] : A(1);
  if (mm == A(0)) {
    kl_zero_row<T, VEC, TEAM>(row, Gd, rows);
    return;
  }
  const KlEdges<A> ed = kl_load_edges<T>(row, P, Q);

  Online<A> st;
  st.init();
  for (int64_t k0 = row.tid; k0 < row.nb; k0 += step * U) {
    Pack<T, VEC> bp[U], bq[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k = k0 + u * step;
      if (k < row.nb) {
        bp[u] = load_pack<T, VEC>(P + row.sp.h + k * VEC);
        bq[u] = load_pack<T, VEC>(Q + row.sp.h + k * VEC);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (k0 + u * step < row.nb) {
        A pv[VEC], qv[VEC];
        to_acc<T, VEC>(bp[u], pv);
        to_acc<T, VEC>(bq[u], qv);
        st.template add<VEC>(pv, qv);
      }
    }
  }
  kl_add_edges(row, ed, st);
  Final<A> f = finalize<TEAM, A>(st, mm, smem);
  if (f.precise) {  // the same for the whole team: its reductions stay together
    __shared__ double dsmem[32 * 3];
    KlPrecise pr;
    pr.init();
    for (int64_t k = row.tid; k < row.nb; k += step) {
      A pv[VEC], qv[VEC];
      to_acc<T, VEC>(load_pack<T, VEC>(P + row.sp.h + k * VEC), pv);
      to_acc<T, VEC>(load_pack<T, VEC>(Q + row.sp.h + k * VEC), qv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) pr.add(pv[j], qv[j], f.mp, f.mq);
    }
    kl_precise_edges(row, ed, f, pr);
    kl_set_precise<TEAM>(pr, f, dsmem);
  }
  if (Gd == nullptr) {
    // An all -inf row of p or q has no softmax: NaN, as kl_init() gives on the pass-2 paths.
    if (row.tid == 0) rows[row.r] = f.pvalid && f.qvalid ? f.pass1_loss() : f.kl_init();
    return;
  }

  A kl[1] = {f.kl_init()};
  // Backwards over the same (k0, u) tiles: the last-read vectors first. One loop per kind of row, each
  // with its own element math (the choice is the same for the team).
  const int64_t nsteps = (row.nb + step * U - 1) / (step * U);
  auto pass2 = [&](auto precise) {
    for (int64_t s = nsteps - 1; s >= 0; --s) {
      const int64_t k0 = s * step * U + row.tid;
      Pack<T, VEC> bp[U], bq[U];
#pragma unroll
      for (int u = U - 1; u >= 0; --u) {
        const int64_t k = k0 + u * step;
        if (k < row.nb) {
          bp[u] = load_pack<T, VEC>(P + row.sp.h + k * VEC);
          bq[u] = load_pack<T, VEC>(Q + row.sp.h + k * VEC);
        }
      }
#pragma unroll
      for (int u = U - 1; u >= 0; --u) {
        const int64_t k = k0 + u * step;
        if (k < row.nb) {
          A pv[VEC], qv[VEC];
          to_acc<T, VEC>(bp[u], pv);
          to_acc<T, VEC>(bq[u], qv);
          Pack<T, VEC> g;
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            g.val[j] = static_cast<T>(f.template grad2<decltype(precise)::value>(pv[j], qv[j], kl[0]));
          }
          store_pack<T, VEC>(Gd + row.sp.h + k * VEC, g);
        }
      }
    }
  };
  if (f.precise) {
    pass2(std::true_type{});
  } else {
    pass2(std::false_type{});
  }
  kl_finish_row<TEAM, T>(row, ed, f, kl, Gd, rows, smem);
}

// Dynamic shared memory of a cached configuration (q's vectors).
template <typename T, int VEC, int VPT, int THREADS>
constexpr int kl_smem() {
  return VPT * THREADS * static_cast<int>(sizeof(Pack<T, VEC>));
}

// Whether a cached configuration can be launched on `device` (the current device): its static +
// dynamic shared memory must fit the device's opt-in limit (cudaDevAttrMaxSharedMemoryPerBlockOptin),
// and over the 48 KB that every block gets, the kernel's dynamic limit is raised there. Found out
// (and the limit raised) once per kernel and device.
template <typename T, int VEC, int TEAM, int VPT, int THREADS>
bool kl_cached_fits(int device) {
  constexpr int smem = kl_smem<T, VEC, VPT, THREADS>();
  static PerDevice fits;
  return fits.get(device, [device] {
    const auto kernel = kl_rows_cached_kernel<T, VEC, TEAM, VPT, THREADS>;
    int optin = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    cudaFuncAttributes attr;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    const int64_t total = static_cast<int64_t>(attr.sharedSizeBytes) + smem;
    if (total > std::max(optin, 48 * 1024)) return 0;
    if (total > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    }
    return 1;
  }) != 0;
}

// Blocks of a launch: one row per warp (TEAM 32) or per block.
template <int TEAM, int THREADS>
unsigned kl_blocks(int64_t N) {
  const int64_t rows_per_block = TEAM == 32 ? THREADS / 32 : 1;
  const int64_t blocks = ceil_div(N, rows_per_block);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "fastvat.kl_div_with_logits: too many rows");
  return static_cast<unsigned>(blocks);
}

template <typename T, int VEC, int TEAM, int VPT, int THREADS>
void launch_kl_cached(const T* p, const T* q, T* g, const acc_t<T>* m, acc_t<T>* rows, int64_t N, int64_t C,
                      int device) {
  const unsigned blocks = kl_blocks<TEAM, THREADS>(N);
  constexpr int smem = kl_smem<T, VEC, VPT, THREADS>();
  TORCH_INTERNAL_ASSERT((kl_cached_fits<T, VEC, TEAM, VPT, THREADS>(device)),
                        "fastvat.kl_div_with_logits: kernel shared memory over the device's limit");
  auto stream = c10::cuda::getCurrentCUDAStream(device);
  FASTVAT_LAUNCH(blocks, THREADS, smem, stream, kl_rows_cached_kernel<T, VEC, TEAM, VPT, THREADS>)(p, q, g, m, rows, N, C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int VEC, int TEAM, int THREADS>
void launch_kl_streamed(const T* p, const T* q, T* g, const acc_t<T>* m, acc_t<T>* rows, int64_t N, int64_t C,
                        int device) {
  const unsigned blocks = kl_blocks<TEAM, THREADS>(N);
  auto stream = c10::cuda::getCurrentCUDAStream(device);
  FASTVAT_LAUNCH(blocks, THREADS, 0, stream, kl_rows_streamed_kernel<T, VEC, TEAM, THREADS>)(p, q, g, m, rows, N, C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Kernel choice for 16-byte aligned rows. kl_div_with_logits always takes kAuto; the others are
// for benchmarks, through the op _kl_div_with_logits_variant.
//   kAuto:      rows of <= 2048 16-byte vectors cached on chip (several blocks per SM), longer rows
//               streamed twice by one 1024-thread block per SM (the row stays in L2);
//   kCached:    also cache rows of <= 4096 vectors (one 512-thread block per SM, no L2 re-read; 64 KB
//               of shared memory, streamed where the device cannot give a block that much);
//   kStream:    always the 1024-thread streaming kernel;
//   kStream512: always the 512-thread streaming kernel (2 blocks per SM).
// Misaligned rows take the scalar streaming kernels whatever the choice.
enum class KlVariant { kAuto, kCached, kStream, kStream512 };

#ifdef FASTVAT_BENCH_OPS
KlVariant parse_kl_variant(c10::string_view v) {
  if (v == "auto") return KlVariant::kAuto;
  if (v == "cached") return KlVariant::kCached;
  if (v == "stream") return KlVariant::kStream;
  if (v == "stream512") return KlVariant::kStream512;
  TORCH_CHECK(false, "fastvat._kl_div_with_logits_variant: variant must be 'auto', 'cached', 'stream' or "
              "'stream512', got '", std::string(v.data(), v.size()), "'");
}
#endif

template <typename T>
void kl_dispatch(const at::Tensor& p, const at::Tensor& q, const at::Tensor& mask, at::Tensor& rows,
                 at::Tensor& grad, int64_t N, int64_t C, KlVariant variant) {
  using A = acc_t<T>;
  constexpr int VEC = vec16<T>();
  const int device = q.get_device();
  const T* pp = p.data_ptr<T>();
  const T* qp = q.data_ptr<T>();
  T* gp = grad.numel() > 0 ? grad.data_ptr<T>() : nullptr;
  const A* mp = mask.defined() ? mask.data_ptr<A>() : nullptr;
  A* rp = rows.data_ptr<A>();
  const bool aligned = is_aligned(pp, 16) && is_aligned(qp, 16) && (gp == nullptr || is_aligned(gp, 16));
  if (aligned) {
    const int64_t nvec = C / VEC;
    if (variant == KlVariant::kAuto || variant == KlVariant::kCached) {
      if (nvec <= 32 * 4) return launch_kl_cached<T, VEC, 32, 4, 256>(pp, qp, gp, mp, rp, N, C, device);
      if (nvec <= 256 * 8) return launch_kl_cached<T, VEC, 256, 8, 256>(pp, qp, gp, mp, rp, N, C, device);
      if (variant == KlVariant::kCached && nvec <= 512 * 8 && kl_cached_fits<T, VEC, 512, 8, 512>(device)) {
        return launch_kl_cached<T, VEC, 512, 8, 512>(pp, qp, gp, mp, rp, N, C, device);
      }
    }
    if (variant == KlVariant::kStream512) return launch_kl_streamed<T, VEC, 512, 512>(pp, qp, gp, mp, rp, N, C, device);
    return launch_kl_streamed<T, VEC, 1024, 1024>(pp, qp, gp, mp, rp, N, C, device);
  }
  if (C <= 1024) return launch_kl_streamed<T, 1, 32, 256>(pp, qp, gp, mp, rp, N, C, device);
  launch_kl_streamed<T, 1, 1024, 1024>(pp, qp, gp, mp, rp, N, C, device);
}

std::tuple<at::Tensor, at::Tensor> kl_rows_cuda(const at::Tensor& p_in, const at::Tensor& q_in,
                                                const std::optional<at::Tensor>& mask_in, bool compute_grad,
                                                KlVariant variant) {
  TORCH_CHECK(q_in.is_cuda(), "fastvat.kl_div_with_logits: q_logits must be a CUDA tensor");
  check_kl_args(p_in, q_in, mask_in);
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous();
  const at::Tensor p = p_in.contiguous();
  const auto acc = at::toOpMathType(q.scalar_type());
  const int64_t N = q.size(0);
  const int64_t C = q.size(1);
  at::Tensor mask;
  if (mask_in.has_value() && mask_in->defined()) mask = mask_in->contiguous();
  auto lead = q.sizes().vec();
  lead.pop_back();
  at::Tensor rows = at::empty(lead, q.options().dtype(acc));
  at::Tensor grad = compute_grad ? at::empty_like(q, at::MemoryFormat::Contiguous) : at::empty({0}, q.options());
  if (rows.numel() == 0) return std::make_tuple(rows, grad);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, q.scalar_type(),
                                  "fastvat_kl_div_with_logits_cuda",
                                  [&] { kl_dispatch<scalar_t>(p, q, mask, rows, grad, N, C, variant); });
  return std::make_tuple(rows, grad);
}

std::tuple<at::Tensor, at::Tensor> kl_div_with_logits_cuda(const at::Tensor& p, const at::Tensor& q,
                                                           const std::optional<at::Tensor>& mask, bool compute_grad) {
  return kl_rows_cuda(p, q, mask, compute_grad, KlVariant::kAuto);
}

#ifdef FASTVAT_BENCH_OPS
// Benchmark-only: kl_div_with_logits with the kernel choice named by `variant` (see KlVariant).
std::tuple<at::Tensor, at::Tensor> kl_div_with_logits_variant_cuda(const at::Tensor& p, const at::Tensor& q,
                                                                   const std::optional<at::Tensor>& mask,
                                                                   bool compute_grad, c10::string_view variant) {
  return kl_rows_cuda(p, q, mask, compute_grad, parse_kl_variant(variant));
}
#endif

}  // namespace
}  // namespace cuda
}  // namespace fastvat

TORCH_LIBRARY_IMPL(fastvat, CUDA, m) {
  m.impl("kl_div_with_logits", &fastvat::cuda::kl_div_with_logits_cuda);
#ifdef FASTVAT_BENCH_OPS
  m.impl("_kl_div_with_logits_variant", &fastvat::cuda::kl_div_with_logits_variant_cuda);
#endif
}
