// Shared by the CPU kernels that need SIMD (l2_normalize, perturb_, kl_div_with_logits).
//
// ISA: setup.py compiles every file with the baseline flags (x86-64 = SSE2), under which ATen's
// at::vec::Vectorized is a plain array and its exp() a scalar libm call per lane. So on x86-64
// with GCC this header opens a `#pragma GCC target("avx2,fma,f16c")` region, selects ATen's
// AVX2 Vectorized (namespace at::vec::AVX2, so nothing collides with baseline code), and the
// including file closes the region with FASTVAT_CPU_VEC_END after its kernels. The op entry
// points and registrations stay outside the region (baseline code) and call the kernels only
// when `simd_enabled()` says the CPU has AVX2 and FMA (hence F16C); otherwise they run an ATen composition
// of the same math (also forced by FASTVAT_CPU_SIMD=0, which the tests use to check it).
// Elsewhere (clang, aarch64, ...) the region is not opened and ATen's default vector code is
// used directly.
//
// Include order in a kernel file: every non-vector header first, then this header, then the
// kernels, then FASTVAT_CPU_VEC_END, then the entry points and TORCH_LIBRARY_IMPL.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/TypeCast.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(CPU_CAPABILITY)
#define FASTVAT_CPU_AVX2 1
#endif

namespace fastvat {
namespace cpu {

// Fixed reduction chunk (elements). Partial sums are taken over chunks whose boundaries depend
// only on the tensor's size, then added in chunk order, so results are the same for any number
// of threads.
constexpr int64_t kChunk = 16384;

inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Robust L2 norms. The fast path sums squares in the accumulation type A, which underflows for tiny
// vectors (fp32: |x| below ~1e-19 per element) and overflows for huge ones (above ~1e19). A sum of
// `count` squares is trusted when it is finite and far enough above A's smallest normal that squares
// lost to underflow change it by less than A's rounding, and the factor scale/||v|| is used as an A
// when it is zero or a normal A. Everything else is recomputed with scaled_norm.
template <typename A>
inline bool sumsq_trusted(double ss, int64_t count) {
  return std::isfinite(ss) && ss >= static_cast<double>(count) * static_cast<double>(std::numeric_limits<A>::min()) * 0x1p24;
}

template <typename A>
inline bool usable_factor(double f) {
  const double a = std::abs(f);
  return a == 0.0 || (a >= static_cast<double>(std::numeric_limits<A>::min()) &&
                      a <= static_cast<double>(std::numeric_limits<A>::max()));
}

// The robust paths are rare (zero groups and vectors near the ends of A's range): kept out of line so
// that the per-group fast path stays small enough to inline with the kernel's apply loop.
#if defined(__GNUC__)
#define FASTVAT_COLD __attribute__((noinline, cold))
#else
#define FASTVAT_COLD
#endif

// x unchanged, but opaque to the optimiser: a product passed through it is rounded on its own, not
// fused with the addition that follows. scaled_norm's sum runs inside the kernels' FMA-enabled code
// (`values` inlines it there), and its result must not depend on whether the compiler contracts it.
// Costs a store and a load, on the robust path only.
inline double rounded(double x) {
#if defined(__GNUC__)
  __asm__("" : "+m"(x));
#endif
  return x;
}

// scale / ||v|| as ldexp(unit, -ex): v scaled by the power of two that brings its largest |v| into
// [0.5, 1) (as LAPACK's nrm2 does), squared and summed in double, where nothing under- or overflows.
// unit == 0 for a group that is exactly zero or holds a NaN/Inf (such a group gets factor 0, as on
// the fast path). `values(f)` calls f(v) for each value of the group in order, v in double.
struct ScaledNorm {
  int ex = 0;
  double unit = 0.0;
};

template <typename Values>
ScaledNorm scaled_norm(const Values& values, double scale) {
  double amax = 0.0;
  bool finite = true;
  values([&](double v) {
    const double a = std::abs(v);
    if (!(a <= std::numeric_limits<double>::max())) finite = false;
    else amax = std::max(amax, a);
  });
  if (!finite || amax == 0.0) return {};
  ScaledNorm r;
  std::frexp(amax, &r.ex);
  double ss = 0.0;
  values([&](double v) {
    const double t = std::ldexp(v, -r.ex);
    ss += rounded(t * t);
  });
  r.unit = scale / std::sqrt(ss);
  return r;
}

// The same scaling with ATen ops, for the fallbacks: scale * v / ||v|| per row of v ([groups, G], in
// the accumulation dtype), bit-identical to the unscaled formula wherever that one does not under- or
// overflow (a power-of-two scaling is exact and cancels out of v / ||v||).
inline at::Tensor normalize_rows(const at::Tensor& v, double scale) {
  const at::Tensor amax = v.abs().amax(1, /*keepdim=*/true);
  const at::Tensor usable = at::isfinite(amax) & (amax > 0);
  // the exponent is clamped so that 2^-ex stays finite in v's dtype (an all-subnormal row)
  const int64_t lowest_ex = v.scalar_type() == at::kDouble ? -1021 : -125;
  const at::Tensor ex = std::get<1>(at::frexp(at::where(usable, amax, at::ones_like(amax)))).clamp_min(lowest_ex);
  const at::Tensor t = v * at::ldexp(at::ones_like(amax), ex.neg());
  const at::Tensor n = (t * t).sum(1, /*keepdim=*/true).to(at::kDouble).sqrt();
  const at::Tensor unit = at::where(usable, at::full_like(n, scale) / n, at::zeros_like(n)).to(v.scalar_type());
  return t * unit;
}

template <typename T>
inline double to_double(T v) {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else {
    return static_cast<double>(static_cast<float>(v));
  }
}

// The factor a group of v is scaled by: `f` on the vector path, or, when scale/||v|| is no normal A
// (vectors near the ends of A's range), v's values scaled in double (ldexp(v, -ex) * unit).
template <typename A>
struct GroupFactor {
  A f = A(0);
  bool in_double = false;
  int ex = 0;
  double unit = 0.0;
};

// The sums of squares ss of `count` values for which the fast path's factor scale / sqrt(ss) is used as
// is: [lo, hi] lies inside what sumsq_trusted and usable_factor accept, with a margin of 16 at the
// ends for the rounding of the bounds and of the factor, so one range test per group stands for
// both checks. A group outside the range goes through robust_factor, which makes the exact checks,
// so the result does not depend on where within the margin the range ends.
template <typename A>
struct FactorRange {
  double lo;
  double hi;
  double scale;
  FactorRange(int64_t count, double s) : scale(s) {
    constexpr double amin = static_cast<double>(std::numeric_limits<A>::min());
    constexpr double amax = static_cast<double>(std::numeric_limits<A>::max());
    lo = static_cast<double>(count) * amin * 0x1p24;  // sumsq_trusted's bound
    hi = std::numeric_limits<double>::max() / 16;
    const double a = std::abs(s);
    if (a != 0.0) {  // a zero scale gives factor 0, usable for any trusted ss
      lo = std::max(lo, 16 * (a / amax) * (a / amax));  // |factor| <= amax
      hi = std::min(hi, (a / amin) * (a / amin) / 16);  // |factor| >= amin
    }
  }
  inline bool contains(double ss) const { return ss >= lo && ss <= hi; }
  inline A factor(double ss) const { return static_cast<A>(scale / std::sqrt(ss)); }
};

// The factor for a group of `count` values whose fast-path sum of squares is ss, when ss is outside
// FactorRange: the fast path's checks made exactly, then scaled_norm. `values` as for scaled_norm.
template <typename A, typename Values>
FASTVAT_COLD GroupFactor<A> robust_factor(const Values& values, int64_t count, double ss, double scale) {
  GroupFactor<A> r;
  const double f = ss > 0 ? scale / std::sqrt(ss) : 0.0;
  if (sumsq_trusted<A>(ss, count) && usable_factor<A>(f)) {
    r.f = static_cast<A>(f);
    return r;
  }
  const ScaledNorm sn = scaled_norm(values, scale);
  const double g = std::ldexp(sn.unit, -sn.ex);
  if (usable_factor<A>(g)) {
    r.f = static_cast<A>(g);
  } else {
    r.in_double = true;
    r.ex = sn.ex;
    r.unit = sn.unit;
  }
  return r;
}

// The factor for a group of `count` values whose fast-path sum of squares is ss.
template <typename A, typename Values>
inline GroupFactor<A> group_factor(const Values& values, int64_t count, double ss, double scale) {
  const FactorRange<A> range(count, scale);
  if (range.contains(ss)) return GroupFactor<A>{range.factor(ss)};
  return robust_factor<A>(values, count, ss, scale);
}

// Whether the vectorized kernels may run: the CPU has the ISA they were compiled for, and
// FASTVAT_CPU_SIMD is not "0".
inline bool simd_enabled() {
  static const bool ok = [] {
    const char* env = std::getenv("FASTVAT_CPU_SIMD");
    if (env != nullptr && env[0] == '0') return false;
#ifdef FASTVAT_CPU_AVX2
    __builtin_cpu_init();
    // Every CPU with AVX2 and FMA also has F16C (which came earlier).
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return true;
#endif
  }();
  return ok;
}

}  // namespace cpu
}  // namespace fastvat

#ifdef FASTVAT_CPU_AVX2
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// Lambdas' function-pointer thunks are emitted without the target; they are never called.
#pragma GCC diagnostic ignored "-Wpsabi"
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define FASTVAT_CPU_VEC_END _Pragma("GCC pop_options")
// g++ does not define the ISA macros for a target pragma in C++; sleef.h (via vec.h) needs them.
#ifndef __AVX__
#define __AVX__ 1
#define FASTVAT_UNDEF_AVX
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#define FASTVAT_UNDEF_AVX2
#endif
#ifndef __FMA__
#define __FMA__ 1
#define FASTVAT_UNDEF_FMA
#endif
#ifndef __F16C__
#define __F16C__ 1
#define FASTVAT_UNDEF_F16C
#endif
#else
#define FASTVAT_CPU_VEC_END
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#ifdef FASTVAT_UNDEF_AVX
#undef __AVX__
#endif
#ifdef FASTVAT_UNDEF_AVX2
#undef __AVX2__
#endif
#ifdef FASTVAT_UNDEF_FMA
#undef __FMA__
#endif
#ifdef FASTVAT_UNDEF_F16C
#undef __F16C__
#endif

namespace fastvat {
namespace cpu {

using at::vec::Vectorized;

// Loads and stores of W = Vectorized<acc_t>::size() elements of T, converted to/from acc_t
// (float for float/half/bfloat16, double for double). `n` variants touch only the first n
// elements (loads fill the other lanes with zero).
template <typename T>
struct VecIO {
  using acc_t = T;
  using V = Vectorized<T>;
  static constexpr int64_t W = V::size();
  static inline V load(const T* p) { return V::loadu(p); }
  static inline V load(const T* p, int64_t n) { return V::loadu(p, n); }
  static inline void store(T* p, const V& v) { v.store(p); }
  static inline void store(T* p, const V& v, int64_t n) { v.store(p, static_cast<int>(n)); }
  // The value after a round trip through T.
  static inline V round(const V& v) { return v; }
  // Store of a value that round() returned (exactly representable in T).
  static inline void store_exact(T* p, const V& v) { store(p, v); }
};

template <typename T>
struct VecIO16 {
  using acc_t = float;
  using V = Vectorized<float>;
  static constexpr int64_t W = V::size();
  static inline V load(const T* p, int64_t n) {
    __at_align__ float tmp[W];
    for (int64_t i = 0; i < W; ++i) tmp[i] = i < n ? static_cast<float>(p[i]) : 0.f;
    return V::loadu(tmp);
  }
  static inline void store(T* p, const V& v, int64_t n) {
    __at_align__ float tmp[W];
    v.store(tmp);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(tmp[i]);
  }
};

template <>
struct VecIO<c10::BFloat16> : VecIO16<c10::BFloat16> {
  using T = c10::BFloat16;
  using VecIO16<T>::load;
  using VecIO16<T>::store;
#ifdef FASTVAT_CPU_AVX2
  static inline V load(const T* p) {
    return V(_mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16)));
  }
  static inline __m128i pack(const V& v) { return at::vec::cvtfp32_bf16(__m256(v)); }
  static inline void store(T* p, const V& v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), pack(v)); }
  // Round to nearest even in the fp32 domain (what pack then load gives, NaN -> 0xffff), without
  // the 32->16 bit narrowing: the update loop rounds every value it also stores.
  static inline V round(const V& v) {
    const __m256i u = _mm256_castps_si256(__m256(v));
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))),
                                       _mm256_set1_epi32(static_cast<int>(0xffff0000u)));
    const __m256 ordered = _mm256_cmp_ps(__m256(v), __m256(v), _CMP_ORD_Q);
    return V(_mm256_blendv_ps(_mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0xffff0000u))),
                              _mm256_castsi256_ps(r), ordered));
  }
  // The low 16 bits of a rounded value are zero: narrowing is a shift and a pack.
  static inline void store_exact(T* p, const V& v) {
    const __m256i hi = _mm256_srli_epi32(_mm256_castps_si256(__m256(v)), 16);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(hi, hi), 0xd8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
#else
  static inline V load(const T* p) { return load(p, W); }
  static inline void store(T* p, const V& v) { store(p, v, W); }
  static inline V round(const V& v) {
    __at_align__ T tmp[W];
    store(tmp, v);
    return load(tmp);
  }
  static inline void store_exact(T* p, const V& v) { store(p, v); }
#endif
};

template <>
struct VecIO<c10::Half> : VecIO16<c10::Half> {
  using T = c10::Half;
  using VecIO16<T>::load;
  using VecIO16<T>::store;
#ifdef FASTVAT_CPU_AVX2
  static inline V load(const T* p) { return V(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))); }
  static inline __m128i pack(const V& v) { return _mm256_cvtps_ph(__m256(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static inline void store(T* p, const V& v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), pack(v)); }
  static inline V round(const V& v) { return V(_mm256_cvtph_ps(pack(v))); }
  static inline void store_exact(T* p, const V& v) { store(p, v); }
#else
  static inline V load(const T* p) { return load(p, W); }
  static inline void store(T* p, const V& v) { store(p, v, W); }
  static inline V round(const V& v) {
    __at_align__ T tmp[W];
    store(tmp, v);
    return load(tmp);
  }
  static inline void store_exact(T* p, const V& v) { store(p, v); }
#endif
};

// Horizontal sum in a fixed lane order.
template <typename V>
inline typename V::value_type hsum(const V& v) {
  using A = typename V::value_type;
  __at_align__ A tmp[V::size()];
  v.store(tmp);
  A s = 0;
  for (int64_t i = 0; i < V::size(); ++i) s += tmp[i];
  return s;
}

}  // namespace cpu
}  // namespace fastvat
