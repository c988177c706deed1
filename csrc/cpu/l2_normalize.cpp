// CPU kernel of fastvat::l2_normalize: out = scale * v / ||v|| per group, v = (x - baseline) * mask.
//
// Groups are `G` consecutive elements of the contiguous x (global: all; sample: per index of
// dim 0; token: per last-dim vector). Each group's sum of squares is a sum of partial sums over
// fixed chunks of kChunk elements, added in chunk order, so the result does not depend on the
// number of threads; only the scheduling does:
//   - small groups (token mode): one task per run of rows, each row read twice from cache;
//   - many large groups (sample mode): one task per group, which stays in L2 between the passes;
//   - few large groups (global mode, small batches): a parallel partial-sum pass over all chunks,
//     then a parallel scale pass.
#include <torch/library.h>

#include "common.h"
#include "cpu/cpu_vec.h"

namespace fastvat {
namespace cpu {
namespace {

template <typename T, bool HasB, bool HasM>
struct L2Kernel {
  using IO = VecIO<T>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  static constexpr int64_t W = IO::W;

  const T* x;
  const T* b;     // baseline, or nullptr
  const T* m;     // mask, or nullptr
  int64_t inner;  // elements per mask entry
  T* out;

  // v over [i, i + n) (n <= W) with a mask value that is constant there.
  inline V load_v(int64_t i, const V& mv) const {
    V v = IO::load(x + i);
    if (HasB) v = v - IO::load(b + i);
    if (HasM) v = v * mv;
    return v;
  }
  inline V load_v(int64_t i, int64_t n, const V& mv) const {
    V v = IO::load(x + i, n);
    if (HasB) v = v - IO::load(b + i, n);
    if (HasM) v = v * mv;
    return v;
  }

  // Calls f(begin, end, mask value) for each maximal run of [a, e) with one mask entry.
  template <typename F>
  inline void for_runs(int64_t a, int64_t e, const F& f) const {
    if (!HasM) {
      f(a, e, acc_t(1));
      return;
    }
    while (a < e) {
      const int64_t k = a / inner;
      const int64_t stop = std::min(e, (k + 1) * inner);
      f(a, stop, static_cast<acc_t>(m[k]));
      a = stop;
    }
  }

  // Sum of squares of v over [a, e), in acc_t within the chunk, returned as double.
  double sumsq(int64_t a, int64_t e) const {
    V s0(acc_t(0)), s1(acc_t(0)), s2(acc_t(0)), s3(acc_t(0));
    for_runs(a, e, [&](int64_t i, int64_t stop, acc_t mval) {
      if (HasM && mval == acc_t(0)) return;
      const V mv(mval);
      for (; i + 4 * W <= stop; i += 4 * W) {
        const V v0 = load_v(i, mv), v1 = load_v(i + W, mv), v2 = load_v(i + 2 * W, mv), v3 = load_v(i + 3 * W, mv);
        s0 = at::vec::fmadd(v0, v0, s0);
        s1 = at::vec::fmadd(v1, v1, s1);
        s2 = at::vec::fmadd(v2, v2, s2);
        s3 = at::vec::fmadd(v3, v3, s3);
      }
      for (; i + W <= stop; i += W) {
        const V v = load_v(i, mv);
        s0 = at::vec::fmadd(v, v, s0);
      }
      if (i < stop) {
        const V v = load_v(i, stop - i, mv);
        s1 = at::vec::fmadd(v, v, s1);
      }
    });
    return static_cast<double>(hsum(V((s0 + s1) + (s2 + s3))));
  }

  // Calls f(i, v) for i in [a, e), v in double (the robust paths); masked-out positions are 0, as on
  // the vector path.
  template <typename F>
  void for_values(int64_t a, int64_t e, const F& f) const {
    for_runs(a, e, [&](int64_t i, int64_t stop, acc_t mval) {
      const double mv = static_cast<double>(mval);
      for (; i < stop; ++i) {
        double v = to_double(x[i]);
        if (HasB) v -= to_double(b[i]);
        if (HasM) v = mv == 0.0 ? 0.0 : v * mv;
        f(i, v);
      }
    });
  }

  // Whether every mask entry over [a, e) is 0 (padding): v is 0 there whatever x holds.
  inline bool masked_out(int64_t a, int64_t e) const {
    if (!HasM) return false;
    int64_t k = a / inner;
    if (static_cast<acc_t>(m[k]) != acc_t(0)) return false;  // most groups, decided by their first entry
    for (++k; k * inner < e; ++k) {
      if (static_cast<acc_t>(m[k]) != acc_t(0)) return false;
    }
    return true;
  }

  // Whether v is exactly 0 over [a, e), in double as on the vector path: every run is masked out or
  // has a finite mask value and x == baseline (x == 0 without one). Tells a zero group from one whose
  // squares underflowed to a zero sum, with vector compares instead of scaled_norm's scalar scan.
  bool zero_group(int64_t a, int64_t e) const {
    bool zero = true;
    for_runs(a, e, [&](int64_t i, int64_t stop, acc_t mval) {
      if (!zero || (HasM && mval == acc_t(0))) return;
      if (HasM && !std::isfinite(mval)) {
        zero = false;
        return;
      }
      constexpr int full = (1 << W) - 1;
      for (; i + W <= stop; i += W) {
        if (load_v(i, V(acc_t(1))).zero_mask() != full) {
          zero = false;
          return;
        }
      }
      if (i < stop && load_v(i, stop - i, V(acc_t(1))).zero_mask() != full) zero = false;
    });
    return zero;
  }

  // out = v * factor over [a, e).
  void apply(int64_t a, int64_t e, acc_t factor) const {
    const V f(factor);
    for_runs(a, e, [&](int64_t i, int64_t stop, acc_t mval) {
      if (HasM && mval == acc_t(0)) {
        std::fill(out + i, out + stop, T(0));
        return;
      }
      const V mv(mval);
      for (; i + 2 * W <= stop; i += 2 * W) {
        IO::store(out + i, load_v(i, mv) * f);
        IO::store(out + i + W, load_v(i + W, mv) * f);
      }
      for (; i + W <= stop; i += W) IO::store(out + i, load_v(i, mv) * f);
      if (i < stop) IO::store(out + i, load_v(i, stop - i, mv) * f, stop - i);
    });
  }
};

// Element-wise mask (mask has x's full shape): v = (x - b) * m with m loaded per element.
template <typename T, bool HasB>
struct L2KernelElementwiseMask {
  using IO = VecIO<T>;
  using acc_t = typename IO::acc_t;
  using V = typename IO::V;
  static constexpr int64_t W = IO::W;
  const T* x;
  const T* b;
  const T* m;
  int64_t inner;
  T* out;

  inline V load_v(int64_t i) const {
    V v = IO::load(x + i);
    if (HasB) v = v - IO::load(b + i);
    return v * IO::load(m + i);
  }
  inline V load_v(int64_t i, int64_t n) const {
    V v = IO::load(x + i, n);
    if (HasB) v = v - IO::load(b + i, n);
    return v * IO::load(m + i, n);
  }
  // No shortcut for masked-out groups: a NaN/Inf of x at a masked-out position makes its group NaN
  // here (v * 0 on the vector path), so such groups go through sumsq and zero_group like any other.
  inline bool masked_out(int64_t, int64_t) const { return false; }
  template <typename F>
  void for_values(int64_t a, int64_t e, const F& f) const {
    for (int64_t i = a; i < e; ++i) {
      double v = to_double(x[i]);
      if (HasB) v -= to_double(b[i]);
      f(i, v * to_double(m[i]));
    }
  }
  // Whether v is exactly 0 over [a, e), in double as on the vector path: at each position x == baseline
  // (x == 0 without one) and the mask is finite, or the mask is 0 and x - baseline finite.
  bool zero_group(int64_t a, int64_t e) const {
    constexpr int full = (1 << W) - 1;
    const auto zero = [](const V& d, const V& mv) {
      const int finite_d = (d - d).zero_mask(), finite_m = (mv - mv).zero_mask();
      return ((d.zero_mask() & finite_m) | (mv.zero_mask() & finite_d)) == full;
    };
    int64_t i = a;
    for (; i + W <= e; i += W) {
      V d = IO::load(x + i);
      if (HasB) d = d - IO::load(b + i);
      if (!zero(d, IO::load(m + i))) return false;
    }
    if (i < e) {
      V d = IO::load(x + i, e - i);
      if (HasB) d = d - IO::load(b + i, e - i);
      if (!zero(d, IO::load(m + i, e - i))) return false;
    }
    return true;
  }
  double sumsq(int64_t a, int64_t e) const {
    V s0(acc_t(0)), s1(acc_t(0));
    int64_t i = a;
    for (; i + 2 * W <= e; i += 2 * W) {
      const V v0 = load_v(i), v1 = load_v(i + W);
      s0 = at::vec::fmadd(v0, v0, s0);
      s1 = at::vec::fmadd(v1, v1, s1);
    }
    for (; i + W <= e; i += W) {
      const V v = load_v(i);
      s0 = at::vec::fmadd(v, v, s0);
    }
    if (i < e) {
      const V v = load_v(i, e - i);
      s1 = at::vec::fmadd(v, v, s1);
    }
    return static_cast<double>(hsum(V(s0 + s1)));
  }
  void apply(int64_t a, int64_t e, acc_t factor) const {
    const V f(factor);
    int64_t i = a;
    for (; i + W <= e; i += W) IO::store(out + i, load_v(i) * f);
    if (i < e) IO::store(out + i, load_v(i, e - i) * f, e - i);
  }
};

// out = ldexp(v, -ex) * unit over [a, e), formed in double: the factor of a vector near the ends of
// acc_t's range, which is no normal acc_t.
template <typename K>
FASTVAT_COLD void apply_in_double(const K& k, int64_t a, int64_t e, const GroupFactor<typename K::acc_t>& f) {
  using acc_t = typename K::acc_t;
  using T = std::remove_const_t<std::remove_pointer_t<decltype(k.x)>>;
  k.for_values(a, e, [&](int64_t i, double v) {
    k.out[i] = static_cast<T>(static_cast<acc_t>(std::ldexp(v, -f.ex) * f.unit));
  });
}

// out = v * factor over [a, e), on the vector path or, for extreme vectors, in double.
template <typename K>
inline void apply_factor(const K& k, int64_t a, int64_t e, const GroupFactor<typename K::acc_t>& f) {
  if (!f.in_double) k.apply(a, e, f.f);
  else apply_in_double(k, a, e, f);
}

// The factor of the group [a, e) whose fast-path sum of squares is ss (outside `range`): 0 for a group
// that is exactly zero (a zero token, x equal to the baseline, a masked-out group on the partial-sum
// schedule) without a scan, anything else through robust_factor.
template <typename K>
FASTVAT_COLD GroupFactor<typename K::acc_t> slow_factor(const K& k, int64_t a, int64_t e, double ss, double scale) {
  using acc_t = typename K::acc_t;
  if (ss == 0.0 && k.zero_group(a, e)) return {};
  const auto values = [&](const auto& f) { k.for_values(a, e, [&](int64_t, double v) { f(v); }); };
  return robust_factor<acc_t>(values, e - a, ss, scale);
}

// out = scale * v / ||v|| over the group [a, e), whose fast-path sum of squares sumsq() returns. A
// masked-out group (padding, on every call with a mask) is written as zeros without summing it.
template <typename K, typename SumSq>
inline void normalize_group(const K& k, int64_t a, int64_t e, const SumSq& sumsq,
                            const FactorRange<typename K::acc_t>& range) {
  using acc_t = typename K::acc_t;
  if (k.masked_out(a, e)) {
    k.apply(a, e, acc_t(0));
    return;
  }
  const double ss = sumsq();
  if (range.contains(ss)) k.apply(a, e, range.factor(ss));
  else apply_factor(k, a, e, slow_factor(k, a, e, ss, range.scale));
}

template <typename K>
void run_groups(const K& k, int64_t numel, int64_t G, double scale) {
  using acc_t = typename K::acc_t;
  const int64_t ng = numel / G;
  const int64_t nc = divup(G, kChunk);
  const FactorRange<acc_t> range(G, scale);
  auto chunk_begin = [G](int64_t g, int64_t c) { return g * G + c * kChunk; };
  auto chunk_end = [G](int64_t g, int64_t c) { return std::min(g * G + (c + 1) * kChunk, (g + 1) * G); };

  if (nc == 1) {
    const int64_t grain = std::max<int64_t>(1, kChunk / G);
    at::parallel_for(0, ng, grain, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t a = g * G, e = a + G;
        normalize_group(k, a, e, [&] { return 0.0 + k.sumsq(a, e); }, range);
      }
    });
    return;
  }
  if (ng >= 2 * static_cast<int64_t>(at::get_num_threads())) {
    at::parallel_for(0, ng, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        const auto sumsq = [&] {
          double ss = 0.0;
          for (int64_t c = 0; c < nc; ++c) ss += k.sumsq(chunk_begin(g, c), chunk_end(g, c));
          return ss;
        };
        normalize_group(k, g * G, (g + 1) * G, sumsq, range);
      }
    });
    return;
  }
  std::vector<double> partial(static_cast<size_t>(ng * nc));
  at::parallel_for(0, ng * nc, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) partial[t] = k.sumsq(chunk_begin(t / nc, t % nc), chunk_end(t / nc, t % nc));
  });
  std::vector<GroupFactor<acc_t>> factor(static_cast<size_t>(ng));
  for (int64_t g = 0; g < ng; ++g) {
    double ss = 0.0;
    for (int64_t c = 0; c < nc; ++c) ss += partial[g * nc + c];
    factor[g] = range.contains(ss) ? GroupFactor<acc_t>{range.factor(ss)} : slow_factor(k, g * G, (g + 1) * G, ss, scale);
  }
  at::parallel_for(0, ng * nc, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / nc, c = t % nc;
      apply_factor(k, chunk_begin(g, c), chunk_end(g, c), factor[g]);
    }
  });
}

template <typename T>
void l2_normalize_kernel(const T* x, const T* b, const T* m, int64_t inner, T* out, int64_t numel, int64_t G,
                         double scale) {
  if (m != nullptr && inner == 1) {
    if (b != nullptr) run_groups(L2KernelElementwiseMask<T, true>{x, b, m, inner, out}, numel, G, scale);
    else run_groups(L2KernelElementwiseMask<T, false>{x, b, m, inner, out}, numel, G, scale);
  } else if (m != nullptr) {
    if (b != nullptr) run_groups(L2Kernel<T, true, true>{x, b, m, inner, out}, numel, G, scale);
    else run_groups(L2Kernel<T, false, true>{x, b, m, inner, out}, numel, G, scale);
  } else {
    if (b != nullptr) run_groups(L2Kernel<T, true, false>{x, b, m, inner, out}, numel, G, scale);
    else run_groups(L2Kernel<T, false, false>{x, b, m, inner, out}, numel, G, scale);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace fastvat

FASTVAT_CPU_VEC_END

namespace fastvat {
namespace cpu {
namespace {

// Same math with ATen ops, for CPUs without the kernels' ISA.
at::Tensor l2_normalize_fallback(const at::Tensor& x, const at::Tensor& b, const at::Tensor& m, int64_t inner,
                                 double scale, int64_t G) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t ng = x.numel() / G;
  at::Tensor v = x.to(acc).reshape({-1});
  if (b.defined()) v = v - b.to(acc).reshape({-1});
  if (m.defined()) v = (v.reshape({-1, inner}) * m.to(acc).reshape({-1, 1})).reshape({-1});
  return normalize_rows(v.reshape({ng, G}), scale).reshape(x.sizes()).to(x.scalar_type()).contiguous();
}

at::Tensor l2_normalize_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& baseline,
                            const c10::optional<at::Tensor>& mask, double scale, c10::string_view norm_sv) {
  const std::string norm(norm_sv);
  check_l2_args(x, baseline, scale);
  const int64_t G = norm_group_length(x, norm);  // validates norm
  const at::Tensor xc = x.contiguous();
  at::Tensor bc;
  if (baseline.has_value()) bc = baseline->contiguous();
  const int64_t inner = mask_inner(x, mask);
  at::Tensor mc;
  if (mask.has_value()) mc = mask->contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t numel = x.numel();
  if (numel == 0) return out;
  if (!simd_enabled()) return l2_normalize_fallback(xc, bc, mc, inner, scale, G);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastvat_l2_normalize_cpu", [&] {
    l2_normalize_kernel<scalar_t>(xc.const_data_ptr<scalar_t>(), bc.defined() ? bc.const_data_ptr<scalar_t>() : nullptr,
                                  mc.defined() ? mc.const_data_ptr<scalar_t>() : nullptr, inner,
                                  out.mutable_data_ptr<scalar_t>(), numel, G, scale);
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace fastvat

TORCH_LIBRARY_IMPL(fastvat, CPU, m) { m.impl("l2_normalize", &fastvat::cpu::l2_normalize_cpu); }
