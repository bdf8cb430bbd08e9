// Row loads, stores and reductions with at::vec, for the kernels of one CPU capability
// (include csrc/common/cpu_target.h first). A row is read into a float (or double) buffer
// whatever its dtype and stride, the kernels work on that buffer while it sits in L1/L2, and the
// result is written back in the output's dtype: contiguous fp32/fp64 rows and 16-bit rows into
// float go through Vectorized loads and conversions, anything else element by element.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace fastattn::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

template <typename T>
inline constexpr bool kIsReduced = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;

// dst[0:n] = (A) src[0:n:stride] for 16-bit T (float and double have their own overloads).
template <typename T, typename A>
void load_row(const T* src, int64_t stride, int64_t n, A* dst) {
  static_assert(kIsReduced<T>);
  if constexpr (std::is_same_v<A, float>) {
    if (stride == 1) {
      using VT = Vectorized<T>;
      using V = Vectorized<float>;
      int64_t i = 0;
      for (; i + VT::size() <= n; i += VT::size()) {
        auto [lo, hi] = at::vec::convert_to_float<T>(VT::loadu(src + i));
        lo.store(dst + i);
        hi.store(dst + i + V::size());
      }
      for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
      return;
    }
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<A>(static_cast<float>(src[i * stride]));
}

// The double path must not round through float.
template <typename A>
void load_row(const double* src, int64_t stride, int64_t n, A* dst) {
  if (stride == 1 && std::is_same_v<A, double>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<A>(src[i]);
    return;
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<A>(src[i * stride]);
}

template <typename A>
void load_row(const float* src, int64_t stride, int64_t n, A* dst) {
  if (stride == 1 && std::is_same_v<A, float>) {
    using V = Vectorized<float>;
    int64_t i = 0;
    for (; i + V::size() <= n; i += V::size()) {
      V::loadu(src + i).store(reinterpret_cast<float*>(dst) + i);
    }
    for (; i < n; ++i) dst[i] = static_cast<A>(src[i]);
    return;
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<A>(src[i * stride]);
}

// dst[0:n:stride] = (T) src[0:n]
template <typename T, typename A>
void store_row(const A* src, int64_t n, T* dst, int64_t stride) {
  if constexpr (std::is_same_v<T, A>) {
    if (stride == 1) {
      using V = Vectorized<A>;
      int64_t i = 0;
      for (; i + V::size() <= n; i += V::size()) V::loadu(src + i).store(dst + i);
      for (; i < n; ++i) dst[i] = src[i];
      return;
    }
    for (int64_t i = 0; i < n; ++i) dst[i * stride] = src[i];
  } else if constexpr (kIsReduced<T> && std::is_same_v<A, float>) {
    if (stride == 1) {
      using VT = Vectorized<T>;
      using V = Vectorized<float>;
      int64_t i = 0;
      for (; i + VT::size() <= n; i += VT::size()) {
        at::vec::convert_from_float<T>(V::loadu(src + i), V::loadu(src + i + V::size()))
            .store(dst + i);
      }
      for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
      return;
    }
    for (int64_t i = 0; i < n; ++i) dst[i * stride] = static_cast<T>(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i * stride] = static_cast<T>(src[i]);
  }
}

// Calls f(T*) with `ptr` cast to the C++ type of `dtype` (the float dtypes fastattn reads).
template <typename F>
void with_float_type(c10::ScalarType dtype, F&& f) {
  switch (dtype) {
    case c10::ScalarType::Float: return f(static_cast<float*>(nullptr));
    case c10::ScalarType::Double: return f(static_cast<double*>(nullptr));
    case c10::ScalarType::Half: return f(static_cast<c10::Half*>(nullptr));
    case c10::ScalarType::BFloat16: return f(static_cast<c10::BFloat16*>(nullptr));
    default: TORCH_CHECK(false, "fastattn: unsupported dtype ", dtype);
  }
}

// Row `offset` (elements) of a float tensor of any of the four dtypes into `dst`.
template <typename A>
void load_any(const void* base, c10::ScalarType dtype, int64_t offset, int64_t stride, int64_t n,
              A* dst) {
  with_float_type(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    load_row(static_cast<const T*>(base) + offset, stride, n, dst);
  });
}

template <typename A>
void store_any(const A* src, int64_t n, void* base, c10::ScalarType dtype, int64_t offset,
               int64_t stride) {
  with_float_type(dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    store_row(src, n, static_cast<T*>(base) + offset, stride);
  });
}

// max of buf[0:n]; NaN propagates (at::vec::maximum).
template <typename A>
A row_max(const A* buf, int64_t n) {
  using V = Vectorized<A>;
  V acc(-std::numeric_limits<A>::infinity());
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) acc = at::vec::maximum(acc, V::loadu(buf + i));
  if (i < n) {
    V tail = V::set(V(-std::numeric_limits<A>::infinity()), V::loadu(buf + i, n - i), n - i);
    acc = at::vec::maximum(acc, tail);
  }
  return at::vec::vec_reduce_all<A>([](V& a, V& b) { return at::vec::maximum(a, b); }, acc);
}

template <typename A>
A vec_sum(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>([](Vectorized<A>& a, Vectorized<A>& b) { return a + b; }, v);
}

// exp(x) for float lanes, within about 2 ulp, several times faster than Sleef's exp (the cost
// that dominates softmax and cross-entropy on CPU): x = n ln2 + r with |r| <= ln2/2 (ln2 split
// in two for an exact reduction), e^r by its degree-7 Taylor polynomial (truncation < 0.1 ulp),
// times 2^n built in the exponent bits, in two halves so that n = -126 and n = 128 stay
// representable. -inf and x < ln(FLT_MIN) give 0, +inf and x > ln(FLT_MAX) give inf, NaN stays
// NaN. Doubles use at::vec's exp (Sleef, 1 ulp).
inline Vectorized<float> fast_exp(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  using VI = Vectorized<int32_t>;
  const V lo(-87.33654f), hi(88.72283f);
  const V xc = at::vec::minimum(at::vec::maximum(x, lo), hi);
  const V n = (xc * V(1.44269504f)).round();
  V r = at::vec::fmadd(n, V(-0.693359375f), xc);
  r = at::vec::fmadd(n, V(2.12194440e-4f), r);
  V p(1.f / 5040.f);
  p = at::vec::fmadd(p, r, V(1.f / 720.f));
  p = at::vec::fmadd(p, r, V(1.f / 120.f));
  p = at::vec::fmadd(p, r, V(1.f / 24.f));
  p = at::vec::fmadd(p, r, V(1.f / 6.f));
  p = at::vec::fmadd(p, r, V(0.5f));
  p = at::vec::fmadd(p, r, V(1.f));
  p = at::vec::fmadd(p, r, V(1.f));
  const VI ni = at::vec::convert_to_int_of_same_size(n);
  const VI n1 = ni >> VI(1);
  const VI n2 = ni - n1;
  const V s1 = at::vec::cast<float>((n1 + VI(127)) << VI(23));
  const V s2 = at::vec::cast<float>((n2 + VI(127)) << VI(23));
  V e = p * s1 * s2;
  e = V::blendv(e, V(0.f), x < lo);
  e = V::blendv(e, V(std::numeric_limits<float>::infinity()), x > hi);
  return V::blendv(e, x, x.isnan());
}

inline Vectorized<double> fast_exp(const Vectorized<double>& x) { return x.exp(); }

// buf[0:n] *= s
template <typename A>
void row_scale(A* buf, int64_t n, A s) {
  using V = Vectorized<A>;
  const V vs(s);
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) (V::loadu(buf + i) * vs).store(buf + i);
  for (; i < n; ++i) buf[i] *= s;
}

}  // namespace fastattn::cpu::CPU_CAPABILITY
