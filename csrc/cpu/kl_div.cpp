// CPU kernel of fastvat::kl_div_with_logits: per row of [N, C] logits,
//   loss = KL(softmax(p) || softmax(q)),  grad = d loss / d q = softmax(q) - softmax(p)  (times mask).
//
// One read pass per row gathers, per vector lane, the running maxima mp, mq and the sums
//   Zp = sum e^{p - mp},  Zq = sum e^{q - mq},  S = sum e^{p - mp} ((p - mp) - (q - mq)),
// moved to the new maxima whenever a block of 16 vectors raises one (online softmax). S is taken
// relative to the maxima, not as e^{p - mp} (p - q): softmax is shift-invariant, and p - q of two
// offset rows (p + a, q - a) would carry |2a| into every term and cancel it only at the end, losing
// digits in proportion to the offset. The lanes are merged in a fixed order, then
// loss = S/Zp - (log Zp - log Zq). When the gradient is wanted a second pass over the same row (still
// in L2) writes it. Rows are independent and are split over threads (up to 4 rows of >= 64k
// classes: column spans, see kl_kernel_split); masked rows (mask == 0) cost nothing and give loss 0,
// gradient 0.
#include <torch/library.h>

#include "common.h"
#include "cpu/cpu_vec.h"

namespace fastvat {
namespace cpu {
namespace {

template <typename A>
struct RowStats {
  A mp, zp, mq, zq, s;
};

// Online-softmax statistics of parts of one row (vector lanes, or column spans), merged in part order.
// A part's S is relative to its own maxima: moving it to the row's adds (MQ - mq) - (MP - mp) per
// unit of Zp before the e^{mp - MP} rescale. A part with Zp = 0 (no class of positive probability)
// adds nothing, also when its maxima are still the `lowest` sentinel.
template <typename A>
RowStats<A> merge_stats(const RowStats<A>* part, int64_t n) {
  RowStats<A> r;
  r.mp = part[0].mp;
  r.mq = part[0].mq;
  for (int64_t i = 1; i < n; ++i) {
    r.mp = std::max(r.mp, part[i].mp);
    r.mq = std::max(r.mq, part[i].mq);
  }
  r.zp = r.zq = r.s = A(0);
  for (int64_t i = 0; i < n; ++i) {
    const A cp = std::exp(part[i].mp - r.mp), cq = std::exp(part[i].mq - r.mq);
    if (part[i].zp != A(0) && cp != A(0)) {
      r.zp += part[i].zp * cp;
      r.s += (part[i].s + ((r.mq - part[i].mq) - (r.mp - part[i].mp)) * part[i].zp) * cp;
    }
    r.zq += part[i].zq * cq;
  }
  return r;
}

template <typename V>
inline V vexp(const V& v) {
  if constexpr (std::is_same_v<typename V::value_type, float>) {
    return v.exp_u20();
  } else {
    return v.exp();
  }
}

template <typename T>
struct KLRow {
  using IO = VecIO<T>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  static constexpr int64_t W = IO::W;
  static constexpr int64_t K = 16;  // vectors per block between max updates

  // (p - mp) - (q - mq), but 0 where softmax(p) is 0 (a class with p = -inf adds nothing, as 0 log 0 = 0).
  static inline V diff(const V& ep, const V& dp, const V& dq) {
    const V zero(acc_t(0));
    return V::blendv(dp - dq, zero, ep == zero);
  }

  // S relative to the old maxima, moved to the new ones (before the e^{mp - nmp} rescale); lanes with
  // Zp = 0 have S = 0 and maxima that may still be the `lowest` sentinel, so they move by nothing.
  // S whose weight underflowed to zero (rescale factor a == 0) is dropped, as Zp is: an infinite S (a
  // class with q = -inf) times 0 would otherwise turn the row into NaN.
  static inline V rescaled(const V& s, const V& a) {
    const V zero(acc_t(0));
    return V::blendv(s, zero, a == zero);
  }

  static inline V shift_s(const V& s, const V& zp, const V& mp, const V& nmp, const V& mq, const V& nmq) {
    const V zero(acc_t(0));
    return s + V::blendv(((nmq - mq) - (nmp - mp)) * zp, zero, zp == zero);
  }

  static RowStats<acc_t> stats(const T* p, const T* q, int64_t C) {
    const acc_t lowest = std::numeric_limits<acc_t>::lowest();
    V mp(lowest), mq(lowest), zp(acc_t(0)), zq(acc_t(0)), s(acc_t(0));
    int64_t i = 0;
    for (; i + K * W <= C; i += K * W) {
      V bp = IO::load(p + i), bq = IO::load(q + i);
      for (int64_t k = 1; k < K; ++k) {
        bp = at::vec::maximum(bp, IO::load(p + i + k * W));
        bq = at::vec::maximum(bq, IO::load(q + i + k * W));
      }
      const V nmp = at::vec::maximum(mp, bp), nmq = at::vec::maximum(mq, bq);
      const V ap = vexp(mp - nmp), aq = vexp(mq - nmq);
      V sp(acc_t(0)), sq(acc_t(0)), ss(acc_t(0));
      for (int64_t k = 0; k < K; ++k) {
        const V dp = IO::load(p + i + k * W) - nmp, dq = IO::load(q + i + k * W) - nmq;
        const V ep = vexp(dp);
        sp = sp + ep;
        sq = sq + vexp(dq);
        ss = at::vec::fmadd(ep, diff(ep, dp, dq), ss);
      }
      s = at::vec::fmadd(rescaled(shift_s(s, zp, mp, nmp, mq, nmq), ap), ap, ss);
      zp = at::vec::fmadd(zp, ap, sp);
      zq = at::vec::fmadd(zq, aq, sq);
      mp = nmp;
      mq = nmq;
    }
    for (; i < C; i += W) {
      const int64_t n = std::min<int64_t>(W, C - i);
      V pv, qv, pm, qm;
      if (n == W) {
        pv = pm = IO::load(p + i);
        qv = qm = IO::load(q + i);
      } else {
        // Zero-filled lanes: keep them out of the maxima and the sums.
        pv = IO::load(p + i, n);
        qv = IO::load(q + i, n);
        pm = V::set(V(lowest), pv, n);
        qm = V::set(V(lowest), qv, n);
      }
      const V nmp = at::vec::maximum(mp, pm), nmq = at::vec::maximum(mq, qm);
      const V ap = vexp(mp - nmp), aq = vexp(mq - nmq);
      V ep = vexp(pm - nmp), eq = vexp(qm - nmq);
      if (n < W) {
        ep = V::set(V(acc_t(0)), ep, n);
        eq = V::set(V(acc_t(0)), eq, n);
      }
      s = at::vec::fmadd(rescaled(shift_s(s, zp, mp, nmp, mq, nmq), ap), ap, ep * diff(ep, pv - nmp, qv - nmq));
      zp = at::vec::fmadd(zp, ap, ep);
      zq = at::vec::fmadd(zq, aq, eq);
      mp = nmp;
      mq = nmq;
    }
    // Merge the lanes in order.
    __at_align__ acc_t amp[W], azp[W], amq[W], azq[W], as[W];
    mp.store(amp);
    zp.store(azp);
    mq.store(amq);
    zq.store(azq);
    s.store(as);
    RowStats<acc_t> lanes[W];
    for (int64_t l = 0; l < W; ++l) lanes[l] = {amp[l], azp[l], amq[l], azq[l], as[l]};
    return merge_stats(lanes, W);
  }

  // g = (e^{q - mq} / Zq - e^{p - mp} / Zp) * m
  static void grad(const T* p, const T* q, int64_t C, const RowStats<acc_t>& r, acc_t m, T* g) {
    const V mp(r.mp), mq(r.mq), cp(m / r.zp), cq(m / r.zq);
    int64_t i = 0;
    for (; i + W <= C; i += W) {
      const V gp = vexp(IO::load(p + i) - mp) * cp;
      IO::store(g + i, at::vec::fmsub(vexp(IO::load(q + i) - mq), cq, gp));
    }
    if (i < C) {
      const int64_t n = C - i;
      const V gp = vexp(IO::load(p + i, n) - mp) * cp;
      IO::store(g + i, at::vec::fmsub(vexp(IO::load(q + i, n) - mq), cq, gp), n);
    }
  }
};

// A handful of very long rows (at most kSplitMaxRows of at least kSplitCols classes: a 128k-class head
// over a few samples) is cut into column spans of kSpan: the spans' statistics are taken in parallel
// and merged per row in span order, then the gradient is written span by span. The choice and the
// cut depend only on the shape, so the result does not depend on the number of threads. More rows
// are split over threads whole: one row's two passes stay in cache, which the span split gives up.
constexpr int64_t kSplitCols = 65536;
constexpr int64_t kSplitMaxRows = 4;
constexpr int64_t kSpan = 32768;

template <typename A>
A row_loss(const RowStats<A>& r) {
  const double loss = static_cast<double>(r.s) / static_cast<double>(r.zp) -
                      (std::log(static_cast<double>(r.zp)) - std::log(static_cast<double>(r.zq)));
  return static_cast<A>(loss);
}

template <typename T, typename A>
void kl_kernel_split(const T* p, const T* q, const A* mask, int64_t N, int64_t C, A* rows, T* g) {
  const int64_t ns = divup(C, kSpan);
  std::vector<RowStats<A>> part(static_cast<size_t>(N * ns));
  auto span = [&](int64_t item, int64_t& n, int64_t& a, int64_t& len) {
    n = item / ns;
    a = (item % ns) * kSpan;
    len = std::min(C, a + kSpan) - a;
  };
  auto masked = [&](int64_t n) { return mask != nullptr && mask[n] == A(0); };
  at::parallel_for(0, N * ns, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      int64_t n, a, len;
      span(it, n, a, len);
      if (!masked(n)) part[it] = KLRow<T>::stats(p + n * C + a, q + n * C + a, len);
    }
  });
  std::vector<RowStats<A>> stats(static_cast<size_t>(N));
  for (int64_t n = 0; n < N; ++n) {
    if (masked(n)) {
      rows[n] = A(0);
      continue;
    }
    stats[n] = merge_stats(part.data() + n * ns, ns);
    rows[n] = row_loss(stats[n]) * (mask != nullptr ? mask[n] : A(1));
  }
  if (g == nullptr) return;
  at::parallel_for(0, N * ns, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      int64_t n, a, len;
      span(it, n, a, len);
      T* gs = g + n * C + a;
      if (masked(n)) {
        std::fill(gs, gs + len, T(0));
      } else {
        KLRow<T>::grad(p + n * C + a, q + n * C + a, len, stats[n], mask != nullptr ? mask[n] : A(1), gs);
      }
    }
  });
}

template <typename T, typename A>
void kl_kernel(const T* p, const T* q, const A* mask, int64_t N, int64_t C, A* rows, T* g) {
  using acc_t = typename VecIO<T>::acc_t;
  static_assert(std::is_same_v<acc_t, A>, "mask/rows must be in the accumulation dtype");
  if (C >= kSplitCols && N <= kSplitMaxRows) {
    kl_kernel_split<T, A>(p, q, mask, N, C, rows, g);
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kChunk / std::max<int64_t>(C, 1));
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t n = r0; n < r1; ++n) {
      const acc_t m = mask != nullptr ? mask[n] : acc_t(1);
      T* gn = g != nullptr ? g + n * C : nullptr;
      if (m == acc_t(0)) {
        rows[n] = acc_t(0);
        if (gn != nullptr) std::fill(gn, gn + C, T(0));
        continue;
      }
      const T* pn = p + n * C;
      const T* qn = q + n * C;
      const RowStats<acc_t> r = KLRow<T>::stats(pn, qn, C);
      rows[n] = row_loss(r) * m;
      if (gn != nullptr) KLRow<T>::grad(pn, qn, C, r, m, gn);
    }
  });
}

}  // namespace
}  // namespace cpu
}  // namespace fastvat

FASTVAT_CPU_VEC_END

namespace fastvat {
namespace cpu {
namespace {

// Same math with ATen ops, for CPUs without the kernels' ISA. Computed in double: ATen's float
// log_softmax and sum keep only about 1e-5 of a small KL's relative accuracy on 100k-class rows,
// where the kernels' shifted accumulation keeps 1e-6 or better.
std::tuple<at::Tensor, at::Tensor> kl_fallback(const at::Tensor& p, const at::Tensor& q, const at::Tensor& mask_in,
                                               bool compute_grad) {
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor mask = mask_in.defined() ? mask_in.to(at::kDouble) : mask_in;
  const at::Tensor lp = at::log_softmax(p.to(at::kDouble), 1), lq = at::log_softmax(q.to(at::kDouble), 1);
  const at::Tensor ep = lp.exp();
  // NaN stays NaN (an all -inf row has no distribution), as in the kernel and the reference
  at::Tensor rows = at::where(ep == 0, at::zeros_like(ep), ep * (lp - lq)).sum(1);
  if (mask.defined()) rows = at::where(mask == 0, at::zeros_like(rows), rows * mask);
  at::Tensor grad;
  if (compute_grad) {
    grad = lq.exp() - ep;
    if (mask.defined()) grad = at::where(mask.unsqueeze(1) == 0, at::zeros_like(grad), grad * mask.unsqueeze(1));
    grad = grad.to(q.scalar_type()).contiguous();
  } else {
    grad = at::empty({0}, q.options());
  }
  return {rows.to(acc).contiguous(), grad};
}

std::tuple<at::Tensor, at::Tensor> kl_div_with_logits_cpu(const at::Tensor& p_logits, const at::Tensor& q_logits,
                                                          const c10::optional<at::Tensor>& mask, bool compute_grad) {
  check_kl_args(p_logits, q_logits, mask);
  const int64_t N = q_logits.size(0), C = q_logits.size(1);
  const auto acc = at::toOpMathType(q_logits.scalar_type());
  at::Tensor mc;
  if (mask.has_value() && mask->defined()) mc = mask->contiguous().reshape({N});
  const at::Tensor p = p_logits.contiguous(), q = q_logits.contiguous();
  if (!simd_enabled()) return kl_fallback(p, q, mc, compute_grad);
  at::Tensor rows = at::empty({N}, q.options().dtype(acc));
  at::Tensor grad = compute_grad ? at::empty({N, C}, q.options()) : at::empty({0}, q.options());
  if (N == 0) return {rows, grad};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fastvat_kl_div_cpu", [&] {
    using acc_t = typename VecIO<scalar_t>::acc_t;
    kl_kernel<scalar_t, acc_t>(p.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(),
                               mc.defined() ? mc.const_data_ptr<acc_t>() : nullptr, N, C,
                               rows.mutable_data_ptr<acc_t>(), compute_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr);
  });
  return {rows, grad};
}

}  // namespace
}  // namespace cpu
}  // namespace fastvat

TORCH_LIBRARY_IMPL(fastvat, CPU, m) { m.impl("kl_div_with_logits", &fastvat::cpu::kl_div_with_logits_cpu); }
