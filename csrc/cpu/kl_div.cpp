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
// in L2) writes it.
//
// Small KLs (nearby distributions, the VAT and R3F regime) and rows whose float statistics overflow
// take a second, exact-difference pass in double (see kl_precise): the usual formula above carries an
// absolute rounding error of about an ulp of each log-sum-exp, as large as a KL of 1e-7 itself, and can
// come out negative. The first pass's maxima are the shifts of the second, so it needs no rescaling.
// Rows are independent and are split over threads (up to 4 rows of >= 64k
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

// Statistics of one row (or column span) in double with the row's maxima mp, mq as fixed shifts:
//   a = p - mp,  t = a - (q - mq) = (p - q) - (mp - mq),  e = e^a,
//   Zp = Σ e,  A = Σ e t,  D = Σ (e^{q - mq} - e) = Zq - Zp.
// The difference of two nearby logits is exact in double, and D's terms are formed as e·expm1(-t) where
// |t| < 1, so both sums keep their relative accuracy however small t is. Then
//   KL = Σπ(p - q) - lse_p + lse_q = A/Zp + log1p(D/Zp),
// whose two terms cancel to first order in t in double, not in the float of the logits.
// Terms of p = -inf (e = 0) add nothing to A; a q = -inf under e > 0 makes A (and the KL) +inf.
struct PreciseStats {
  double zp = 0, a = 0, d = 0;
  PreciseStats& operator+=(const PreciseStats& o) {
    zp += o.zp;
    a += o.a;
    d += o.d;
    return *this;
  }
  double loss() const {
    const double kl = a / zp + std::log1p(d / zp);
    // never below 0 (the rounding of a KL of 0); NaN stays NaN
    return kl < 0.0 ? 0.0 : kl;
  }
};

// The exact-difference pass runs on few rows: out of line, so that it changes nothing in the code of
// the ordinary rows' loops (inlined, it cost them an instruction per vector).
#if defined(__GNUC__)
#define FASTVAT_KL_OUTLINE __attribute__((noinline))
#else
#define FASTVAT_KL_OUTLINE
#endif

template <typename T>
struct KLPrecise {
  using Vd = Vectorized<double>;
  static constexpr int64_t W = Vd::size();

  static inline Vd load(const T* x) {
    __at_align__ double b[W];
    for (int64_t j = 0; j < W; ++j) b[j] = static_cast<double>(x[j]);
    return Vd::loadu(b);
  }

  static inline void term(double pv, double qv, double mp, double mq, PreciseStats& s) {
    const double a = pv - mp, t = a - (qv - mq), e = std::exp(a);
    s.zp += e;
    s.a += e == 0.0 ? 0.0 : e * t;
    s.d += std::abs(t) < 1.0 ? e * std::expm1(-t) : std::exp(qv - mq) - e;
  }

  FASTVAT_KL_OUTLINE static PreciseStats stats(const T* p, const T* q, int64_t C, double mp, double mq) {
    const Vd vmp(mp), vmq(mq), zero(0.0), one(1.0);
    Vd zp(0.0), sa(0.0), sd(0.0);
    int64_t i = 0;
    for (; i + W <= C; i += W) {
      const Vd pv = load(p + i), qv = load(q + i);
      const Vd a = pv - vmp, dq = qv - vmq, t = a - dq, e = a.exp();
      zp = zp + e;
      sa = sa + Vd::blendv(e * t, zero, e == zero);
      const Vd near = t.abs() < one;
      // expm1 of a masked-out lane may be inf or NaN; blendv drops it
      sd = sd + Vd::blendv(dq.exp() - e, e * (zero - Vd::blendv(zero, t, near)).expm1(), near);
    }
    __at_align__ double bz[W], ba[W], bd[W];
    zp.store(bz);
    sa.store(ba);
    sd.store(bd);
    PreciseStats s;
    for (int64_t j = 0; j < W; ++j) s += PreciseStats{bz[j], ba[j], bd[j]};
    PreciseStats tail;
    for (; i < C; ++i) term(static_cast<double>(p[i]), static_cast<double>(q[i]), mp, mq, tail);
    return s += tail;
  }

  // g = (softmax(q) - softmax(p)) * m = π·expm1(-t - L) * m, L = log(Zq/Zp) = log1p(D/Zp): exactly 0
  // where p = q, accurate relative to its own size where they are close; where |t + L| >= 1 the plain
  // difference e^{q-mq}/Zq - e/Zp has no cancellation to lose digits to.
  static inline double gterm(double pv, double qv, double mp, double mq, double inv_zp, double inv_zq, double L) {
    const double a = pv - mp, x = (qv - mq) - a - L;
    const double pi = std::exp(a) * inv_zp;
    return std::abs(x) < 1.0 ? pi * std::expm1(x) : std::exp(qv - mq) * inv_zq - pi;
  }

  FASTVAT_KL_OUTLINE static void grad(const T* p, const T* q, int64_t C, double mp, double mq, const PreciseStats& r,
                                      double m, T* g) {
    const double L = std::log1p(r.d / r.zp);
    const double inv_zp = 1.0 / r.zp, inv_zq = 1.0 / (r.zp + r.d);
    const Vd vmp(mp), vmq(mq), vL(L), vip(inv_zp), viq(inv_zq), vm(m), zero(0.0), one(1.0);
    int64_t i = 0;
    __at_align__ double b[W];
    for (; i + W <= C; i += W) {
      const Vd a = load(p + i) - vmp, dq = load(q + i) - vmq, x = dq - a - vL;
      const Vd pi = a.exp() * vip;
      const Vd near = x.abs() < one;
      const Vd gv = Vd::blendv(dq.exp() * viq - pi, pi * Vd::blendv(zero, x, near).expm1(), near) * vm;
      gv.store(b);
      for (int64_t j = 0; j < W; ++j) g[i + j] = static_cast<T>(b[j]);
    }
    for (; i < C; ++i) g[i] = static_cast<T>(gterm(p[i], q[i], mp, mq, inv_zp, inv_zq, L) * m);
  }
};

// Whether a row's float statistics give its KL to better than about 1e-4 relative: the rounding of
// the usual formula is an absolute error of a few ulp of the accumulation type (measured for float:
// at most 5e-7 up to C = 128k and offsets of 1e4, so at most 5e-5 relative above the threshold), so
// rows with a smaller KL, and rows whose statistics overflowed (S = inf for a KL that is finite in
// double) or are NaN, are redone by KLPrecise.
template <typename A>
inline bool fast_loss_ok(double loss) {
  constexpr double tau = std::is_same_v<A, double> ? 1e-9 : 1e-2;
  return loss > tau && loss < std::numeric_limits<double>::infinity();
}

// A handful of very long rows (at most kSplitMaxRows of at least kSplitCols classes: a 128k-class head
// over a few samples) is cut into column spans of kSpan: the spans' statistics are taken in parallel
// and merged per row in span order, then the gradient is written span by span. The choice and the
// cut depend only on the shape, so the result does not depend on the number of threads. More rows
// are split over threads whole: one row's two passes stay in cache, which the span split gives up.
constexpr int64_t kSplitCols = 65536;
constexpr int64_t kSplitMaxRows = 4;
constexpr int64_t kSpan = 32768;

template <typename A>
double row_loss(const RowStats<A>& r) {
  return static_cast<double>(r.s) / static_cast<double>(r.zp) -
         (std::log(static_cast<double>(r.zp)) - std::log(static_cast<double>(r.zq)));
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
  std::vector<char> precise(static_cast<size_t>(N), 0);
  bool any_precise = false;
  for (int64_t n = 0; n < N; ++n) {
    if (masked(n)) {
      rows[n] = A(0);
      continue;
    }
    stats[n] = merge_stats(part.data() + n * ns, ns);
    const double loss = row_loss(stats[n]);
    if (fast_loss_ok<A>(loss)) {
      rows[n] = static_cast<A>(loss) * (mask != nullptr ? mask[n] : A(1));
    } else {
      precise[n] = 1;
      any_precise = true;
    }
  }
  std::vector<PreciseStats> pstats;
  if (any_precise) {
    std::vector<PreciseStats> ppart(static_cast<size_t>(N * ns));
    at::parallel_for(0, N * ns, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t it = i0; it < i1; ++it) {
        int64_t n, a, len;
        span(it, n, a, len);
        if (precise[n]) {
          ppart[it] = KLPrecise<T>::stats(p + n * C + a, q + n * C + a, len, stats[n].mp, stats[n].mq);
        }
      }
    });
    pstats.resize(static_cast<size_t>(N));
    for (int64_t n = 0; n < N; ++n) {
      if (!precise[n]) continue;
      for (int64_t s = 0; s < ns; ++s) pstats[n] += ppart[n * ns + s];  // span order
      rows[n] = static_cast<A>(pstats[n].loss()) * (mask != nullptr ? mask[n] : A(1));
    }
  }
  if (g == nullptr) return;
  at::parallel_for(0, N * ns, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      int64_t n, a, len;
      span(it, n, a, len);
      T* gs = g + n * C + a;
      const A m = mask != nullptr ? mask[n] : A(1);
      if (masked(n)) {
        std::fill(gs, gs + len, T(0));
      } else if (precise[n]) {
        KLPrecise<T>::grad(p + n * C + a, q + n * C + a, len, stats[n].mp, stats[n].mq, pstats[n], m, gs);
      } else {
        KLRow<T>::grad(p + n * C + a, q + n * C + a, len, stats[n], m, gs);
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
      const double loss = row_loss(r);
      if (fast_loss_ok<acc_t>(loss)) {
        rows[n] = static_cast<acc_t>(loss) * m;
        if (gn != nullptr) KLRow<T>::grad(pn, qn, C, r, m, gn);
      } else {
        const PreciseStats ps = KLPrecise<T>::stats(pn, qn, C, r.mp, r.mq);
        rows[n] = static_cast<acc_t>(ps.loss()) * m;
        if (gn != nullptr) KLPrecise<T>::grad(pn, qn, C, r.mp, r.mq, ps, m, gn);
      }
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

// Same math with ATen ops, for CPUs without the kernels' ISA: KLPrecise's exact-difference form for
// every row, in double (ATen's float log_softmax and sum keep only about 1e-5 of a small KL's relative
// accuracy on 100k-class rows, and the plain formula none of a KL below ~1e-7).
std::tuple<at::Tensor, at::Tensor> kl_fallback(const at::Tensor& p, const at::Tensor& q, const at::Tensor& mask_in,
                                               bool compute_grad) {
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor mask = mask_in.defined() ? mask_in.to(at::kDouble) : mask_in;
  const at::Tensor P = p.to(at::kDouble), Q = q.to(at::kDouble);
  // An all -inf row has maximum -inf and a = NaN: the row is NaN (no distribution), as in the kernel.
  const at::Tensor a = P - std::get<0>(P.max(1, true));
  const at::Tensor dq = Q - std::get<0>(Q.max(1, true));
  const at::Tensor t = a - dq, e = a.exp(), eq = dq.exp();
  const at::Tensor zp = e.sum(1);
  const at::Tensor zero = at::zeros({}, P.options());
  const at::Tensor A = at::where(e == 0, zero, e * t).sum(1);
  const at::Tensor near = t.abs() < 1;
  const at::Tensor D = at::where(near, e * at::expm1(-at::where(near, t, zero)), eq - e).sum(1);
  const at::Tensor L = at::log1p(D / zp);
  at::Tensor rows = A / zp + L;
  rows = at::where(rows < 0, zero, rows);  // a KL is never negative; NaN stays NaN
  if (mask.defined()) rows = at::where(mask == 0, at::zeros_like(rows), rows * mask);
  at::Tensor grad;
  if (compute_grad) {
    const at::Tensor x = dq - a - L.unsqueeze(1), pi = e / zp.unsqueeze(1);
    const at::Tensor nearg = x.abs() < 1;
    grad = at::where(nearg, pi * at::expm1(at::where(nearg, x, zero)), eq / (zp + D).unsqueeze(1) - pi);
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
