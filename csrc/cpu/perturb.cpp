// CPU kernel of fastvat::perturb_:
//   new = scale * direction / ||direction||  (one global norm)
//   weight += new - previous                 (previous = delta on entry when has_previous, else 0)
//   delta = new
// Two passes: partial sums of squares of direction over fixed chunks (added in chunk order, so
// the norm does not depend on the thread count), then one fused pass that reads direction,
// delta (when has_previous) and weight and writes weight and delta. delta is the caller's
// buffer, reused from call to call, so no output is allocated.
#include <torch/library.h>

#include "common.h"
#include "cpu/cpu_vec.h"

namespace fastvat {
namespace cpu {
namespace {

template <typename T>
double sumsq_chunk(const T* d, int64_t a, int64_t e) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  using acc_t = typename IO::acc_t;
  constexpr int64_t W = IO::W;
  V s0(acc_t(0)), s1(acc_t(0)), s2(acc_t(0)), s3(acc_t(0));
  int64_t i = a;
  for (; i + 4 * W <= e; i += 4 * W) {
    const V v0 = IO::load(d + i), v1 = IO::load(d + i + W), v2 = IO::load(d + i + 2 * W), v3 = IO::load(d + i + 3 * W);
    s0 = at::vec::fmadd(v0, v0, s0);
    s1 = at::vec::fmadd(v1, v1, s1);
    s2 = at::vec::fmadd(v2, v2, s2);
    s3 = at::vec::fmadd(v3, v3, s3);
  }
  for (; i + W <= e; i += W) {
    const V v = IO::load(d + i);
    s0 = at::vec::fmadd(v, v, s0);
  }
  if (i < e) {
    const V v = IO::load(d + i, e - i);
    s1 = at::vec::fmadd(v, v, s1);
  }
  return static_cast<double>(hsum(V((s0 + s1) + (s2 + s3))));
}

// Over [a, e): n = round(d * f); w = round(w + (n - prev)); delta = n.
template <typename T, bool HasPrev>
void update_range(T* w, const T* d, T* delta, typename VecIO<T>::acc_t f, int64_t a, int64_t e) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  constexpr int64_t W = IO::W;
  const V fv(f);
  int64_t i = a;
  for (; i + W <= e; i += W) {
    const V n = IO::round(IO::load(d + i) * fv);
    V step = n;
    if (HasPrev) step = n - IO::load(delta + i);
    IO::store(w + i, IO::load(w + i) + step);
    IO::store_exact(delta + i, n);
  }
  if (i < e) {
    const int64_t k = e - i;
    const V n = IO::round(IO::load(d + i, k) * fv);
    V step = n;
    if (HasPrev) step = n - IO::load(delta + i, k);
    IO::store(w + i, IO::load(w + i, k) + step, k);
    IO::store(delta + i, n, k);
  }
}

// update_range for a direction whose factor is no normal acc_t (near the ends of its range): the new
// perturbation ldexp(d, -ex) * unit is formed in double, then rounded as on the vector path.
template <typename T>
void update_range_in_double(T* w, const T* d, T* delta, const GroupFactor<typename VecIO<T>::acc_t>& f,
                            bool has_previous, int64_t a, int64_t e) {
  using acc_t = typename VecIO<T>::acc_t;
  for (int64_t i = a; i < e; ++i) {
    const T n = static_cast<T>(static_cast<acc_t>(std::ldexp(to_double(d[i]), -f.ex) * f.unit));
    acc_t step = static_cast<acc_t>(n);
    if (has_previous) step -= static_cast<acc_t>(delta[i]);
    w[i] = static_cast<T>(static_cast<acc_t>(w[i]) + step);
    delta[i] = n;
  }
}

template <typename T>
void perturb_kernel(T* w, const T* d, T* delta, int64_t numel, double scale, bool has_previous) {
  using acc_t = typename VecIO<T>::acc_t;
  const int64_t nc = divup(numel, kChunk);
  std::vector<double> partial(static_cast<size_t>(nc));
  at::parallel_for(0, nc, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) partial[c] = sumsq_chunk(d, c * kChunk, std::min(numel, (c + 1) * kChunk));
  });
  double ss = 0.0;
  for (int64_t c = 0; c < nc; ++c) ss += partial[c];
  const auto values = [d, numel](const auto& f) {
    for (int64_t i = 0; i < numel; ++i) f(to_double(d[i]));
  };
  const GroupFactor<acc_t> f = group_factor<acc_t>(values, numel, ss, scale);
  at::parallel_for(0, nc, 1, [&](int64_t c0, int64_t c1) {
    const int64_t a = c0 * kChunk, e = std::min(numel, c1 * kChunk);
    if (f.in_double) update_range_in_double(w, d, delta, f, has_previous, a, e);
    else if (has_previous) update_range<T, true>(w, d, delta, f.f, a, e);
    else update_range<T, false>(w, d, delta, f.f, a, e);
  });
}

}  // namespace
}  // namespace cpu
}  // namespace fastvat

FASTVAT_CPU_VEC_END

namespace fastvat {
namespace cpu {
namespace {

// Same math with ATen ops, for CPUs without the kernels' ISA and for a direction of another dtype
// than the weight (normalised in the direction's precision, then rounded to the weight's). ops.perturb_
// widens a direction narrower than the weight first, so that here the direction is the wider one.
void perturb_fallback(at::Tensor& w, const at::Tensor& d, at::Tensor& delta, double scale, bool has_previous) {
  const auto acc = w.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto dacc = d.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // the new perturbation in the direction's dtype, then the weight's (the reference's
  // l2_normalize(...).to(weight.dtype))
  const at::Tensor nw =
      normalize_rows(d.to(dacc).reshape({1, -1}), scale).reshape(d.sizes()).to(d.scalar_type()).to(w.scalar_type());
  at::Tensor step = nw.to(acc);
  if (has_previous) step = step - delta.to(acc);
  w.copy_(w.to(acc) + step);
  delta.copy_(nw);
}

void perturb_cpu(at::Tensor& weight, const at::Tensor& direction, at::Tensor& delta, double scale,
                 bool has_previous) {
  check_perturb_args(weight, direction, delta, scale);
  const int64_t numel = weight.numel();
  if (numel == 0) return;
  // Read direction first (it may alias delta or weight).
  const bool same_dtype = direction.scalar_type() == weight.scalar_type();
  at::Tensor d = direction.contiguous();  // a direction of another dtype goes to the fallback, which copies
  // The kernel works on contiguous memory; strided weight/delta are updated through copies.
  at::Tensor w = weight.is_contiguous() ? weight : weight.contiguous();
  at::Tensor dl = delta.is_contiguous() ? delta : delta.contiguous();
  if (!simd_enabled() || !same_dtype) {
    perturb_fallback(w, d, dl, scale, has_previous);
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "fastvat_perturb_cpu", [&] {
      perturb_kernel<scalar_t>(w.mutable_data_ptr<scalar_t>(), d.const_data_ptr<scalar_t>(),
                               dl.mutable_data_ptr<scalar_t>(), numel, scale, has_previous);
    });
  }
  if (!w.is_same(weight)) weight.copy_(w);
  if (!dl.is_same(delta)) delta.copy_(dl);
}

}  // namespace
}  // namespace cpu
}  // namespace fastvat

TORCH_LIBRARY_IMPL(fastvat, CPU, m) { m.impl("perturb_", &fastvat::cpu::perturb_cpu); }
