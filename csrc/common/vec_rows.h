// Row loads, stores, reductions and exp with at::vec, for the kernels of one CPU capability
// (include csrc/common/cpu_target.h first). The sweeps (row_max, exp_sum, row_sum, row_dot,
// row_scale) work on float (double) rows in memory: the tensors themselves for contiguous fp32
// rows, else a buffer that load_row / load_any fill from any dtype and stride and store_row /
// store_any write back in the output's dtype (contiguous fp32/fp64 rows and 16-bit rows into
// float go through Vectorized loads and conversions, anything else element by element).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace fastattn::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

// Rows are summed in chunks of kSumChunk elements, each chunk's vector sum added into a
// double: the float error then grows with the chunk, not with the row (a 70k-column row summed
// in 64 float lanes alone drifted past PyTorch's cascade sum in the log-softmax backward).
constexpr int64_t kSumChunk = 2048;

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

// max of two vectors, for row maxima: with AVX-512 float one vmaxps, which drops a NaN operand
// (at::vec::maximum would take three instructions to propagate it). Callers must not rely on a
// NaN in the row reaching the max: every kernel here follows the max with exp(x - max) and a
// sum, which a NaN element makes NaN whatever the max is.
template <typename A>
inline Vectorized<A> max_drop_nan(const Vectorized<A>& a, const Vectorized<A>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) return _mm512_max_ps(a, b);
#endif
  return at::vec::maximum(a, b);
}

// max of x[0:n] * scale (a NaN element may be dropped, see max_drop_nan; the max of nothing is
// -inf). Four accumulators, so the loop runs at the load rate rather than at the latency of
// one chain of maxima.
template <typename A>
A row_max(const A* x, int64_t n, A scale = A(1)) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  const V vscale(scale);
  const bool scaled = scale != A(1);
  auto ld = [&](int64_t i) { return scaled ? V::loadu(x + i) * vscale : V::loadu(x + i); };
  V a0(-std::numeric_limits<A>::infinity()), a1(a0), a2(a0), a3(a0);
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    a0 = max_drop_nan(a0, ld(i));
    a1 = max_drop_nan(a1, ld(i + W));
    a2 = max_drop_nan(a2, ld(i + 2 * W));
    a3 = max_drop_nan(a3, ld(i + 3 * W));
  }
  for (; i + W <= n; i += W) a0 = max_drop_nan(a0, ld(i));
  if (i < n) {
    V tail = V::loadu(x + i, n - i);
    if (scaled) tail = tail * vscale;
    a1 = max_drop_nan(a1, V::set(V(-std::numeric_limits<A>::infinity()), tail, n - i));
  }
  a0 = max_drop_nan(max_drop_nan(a0, a1), max_drop_nan(a2, a3));
  return at::vec::vec_reduce_all<A>([](V& a, V& b) { return max_drop_nan(a, b); }, a0);
}

template <typename A>
A vec_sum(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>([](Vectorized<A>& a, Vectorized<A>& b) { return a + b; }, v);
}

// exp(x) for float lanes, within about 2 ulp, several times faster than Sleef's exp (the cost
// that dominates softmax and cross-entropy on CPU): x = n ln2 + r with |r| <= ln2/2 (ln2 split
// in two for an exact reduction), e^r by a degree-6 minimax polynomial (relative error 3e-9;
// the result is within 0.9 ulp over the whole range, measured against float64), times 2^n. -inf gives 0, +inf and x > ln(FLT_MAX) give inf, NaN stays NaN. With AVX-512,
// 2^n is one vscalefps, which also gets overflow, underflow and subnormal results right, and
// the clamps take NaN through (vminps/vmaxps return their second operand when either is NaN):
// 14 instructions a vector. Elsewhere 2^n is built in the exponent bits, in two halves so that
// n = -126 and n = 128 stay representable, and the special values are blended in. kNonPositive:
// the caller promises x <= 0 or NaN (x - max of a row), so the upper clamp is left out. Doubles
// use at::vec's exp (Sleef, 1 ulp).
inline Vectorized<float> exp_poly(const Vectorized<float>& r) {
  using V = Vectorized<float>;
  V p(1.38145464e-3f);
  p = at::vec::fmadd(p, r, V(8.36869702e-3f));
  p = at::vec::fmadd(p, r, V(4.16683890e-2f));
  p = at::vec::fmadd(p, r, V(1.66665211e-1f));
  p = at::vec::fmadd(p, r, V(4.99999940e-1f));
  p = at::vec::fmadd(p, r, V(1.f));
  return at::vec::fmadd(p, r, V(1.f));
}

#if defined(CPU_CAPABILITY_AVX512)
template <bool kNonPositive = false>
inline Vectorized<float> fast_exp(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  // Below -104 the result rounds to 0 and above 89 to inf, so clamping there changes nothing
  // but keeps n finite (x = -inf would otherwise make r NaN).
  __m512 xc = kNonPositive ? __m512(x) : _mm512_min_ps(_mm512_set1_ps(89.f), x);
  xc = _mm512_max_ps(_mm512_set1_ps(-104.f), xc);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693359375f), xc);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  return _mm512_scalef_ps(exp_poly(V(r)), n);
}
#else
template <bool kNonPositive = false>
inline Vectorized<float> fast_exp(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  using VI = Vectorized<int32_t>;
  const V lo(-87.33654f), hi(88.72283f);
  const V xc = at::vec::minimum(at::vec::maximum(x, lo), hi);
  const V n = (xc * V(1.44269504f)).round();
  V r = at::vec::fmadd(n, V(-0.693359375f), xc);
  r = at::vec::fmadd(n, V(2.12194440e-4f), r);
  const V p = exp_poly(r);
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
#endif

template <bool kNonPositive = false>
inline Vectorized<double> fast_exp(const Vectorized<double>& x) {
  return x.exp();
}

#if defined(CPU_CAPABILITY_AVX512)
// exp(x * scale - m) for 16 float lanes, in base 2 as exp_sum_chunk (below) describes: exact 0
// for x = -inf, NaN stays NaN, and for x * scale - m <= 0 (to rounding) within about 1 ulp plus
// the relative error |x * scale - m| 2^-24 of the base change.
inline __m512 exp2_shifted(__m512 x, __m512 scale, __m512 m) {
  // 2^-150 rounds to 0; the clamp keeps n finite for x = -inf. NaN passes (second operand).
  const __m512 d = _mm512_fmsub_ps(x, scale, m);
  const __m512 t = _mm512_max_ps(_mm512_set1_ps(-150.f),
                                 _mm512_mul_ps(d, _mm512_set1_ps(1.44269504088896341f)));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.535331248e-04f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339886105e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437849e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332367e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264774e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471825e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}
#endif

// sum_i exp(x_i * scale - m) over x[0:n], also written to out[0:n] when kStore (out may be x).
// kNonPositive: m is row_max(x, n, scale), so the exponents are <= 0 (to rounding) or NaN.
// x * scale - m is one fused multiply-add, so a scale costs nothing.
//
// With AVX-512 and kNonPositive the sweep works in base 2: d = x * scale - m (rounded as torch
// rounds x - m), t = d log2 e, 2^t = 2^(t - n) 2^n with n = round(t), 2^(t - n) by a degree-6
// minimax polynomial (0.95 ulp) and 2^n by vscalefps: 8 multiply-add-class instructions a
// vector instead of fast_exp's 10 (softmax's forward and cross-entropy are bound by them). The
// extra rounding of d log2 e is a relative error of about |d| 2^-24 in an element exp(d) times
// the largest; measured, softmax's max error stays within 1.4x torch.softmax's against float64
// for inputs of std 1 to 1000 and scales 1/8 to -2.
//
// next_x (may be null): where the same columns of the next row lie. This sweep is bound by
// arithmetic, so it asks for them in L2 as it goes, two lines a step: the next row's max sweep
// then reads L2 instead of waiting on memory.
template <bool kStore, bool kNonPositive = true, typename A>
A exp_sum_chunk(const A* x, int64_t n, A scale, A m, A* out, const A* next_x = nullptr) {
  auto prefetch = [&](int64_t i) {
    if (next_x != nullptr) __builtin_prefetch(next_x + i, 0, 2);
  };
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (kNonPositive && std::is_same_v<A, float>) {
    constexpr int64_t W = Vectorized<float>::size();
    const __m512 vscale = _mm512_set1_ps(scale), vm = _mm512_set1_ps(m);
    auto exp2_of = [&](__m512 xv) { return exp2_shifted(xv, vscale, vm); };
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 2 * W <= n; i += 2 * W) {
      prefetch(i);
      prefetch(i + W);
      const __m512 e0 = exp2_of(_mm512_loadu_ps(x + i));
      const __m512 e1 = exp2_of(_mm512_loadu_ps(x + i + W));
      if constexpr (kStore) {
        _mm512_storeu_ps(out + i, e0);
        _mm512_storeu_ps(out + i + W, e1);
      }
      s0 = _mm512_add_ps(s0, e0);
      s1 = _mm512_add_ps(s1, e1);
    }
    for (; i < n; i += W) {
      const int64_t k = std::min<int64_t>(W, n - i);
      const __mmask16 mask = static_cast<__mmask16>((1u << k) - 1u);
      const __m512 e = _mm512_maskz_mov_ps(mask, exp2_of(_mm512_maskz_loadu_ps(mask, x + i)));
      if constexpr (kStore) _mm512_mask_storeu_ps(out + i, mask, e);
      s0 = _mm512_add_ps(s0, e);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
  }
#endif
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  const V vscale(scale), vm(m);
  V s0(0), s1(0);
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    if constexpr (2 * W * sizeof(A) >= 128) {  // a cache line or more per vector
      prefetch(i);
      prefetch(i + W);
    } else if (i % (128 / sizeof(A)) == 0) {
      prefetch(i);
      prefetch(i + 64 / sizeof(A));
    }
    const V e0 = fast_exp<kNonPositive>(at::vec::fmsub(V::loadu(x + i), vscale, vm));
    const V e1 = fast_exp<kNonPositive>(at::vec::fmsub(V::loadu(x + i + W), vscale, vm));
    if constexpr (kStore) {
      e0.store(out + i);
      e1.store(out + i + W);
    }
    s0 += e0;
    s1 += e1;
  }
  for (; i < n; i += W) {
    const int64_t k = std::min<int64_t>(W, n - i);
    V e = fast_exp<kNonPositive>(at::vec::fmsub(V::loadu(x + i, k), vscale, vm));
    if (k < W) e = V::set(V(0), e, k);
    if constexpr (kStore) e.store(out + i, k);
    s0 += e;
  }
  return vec_sum(s0 + s1);
}

// exp_sum over the row in chunks of kSumChunk, the chunk sums added in double (see row_sum):
// the sum's error, which shifts every log-softmax output by log(s), stays that of one chunk.
// next_x as exp_sum_chunk's.
template <bool kStore, bool kNonPositive = true, typename A>
A exp_sum(const A* x, int64_t n, A scale, A m, A* out, const A* next_x = nullptr) {
  double total = 0;
  for (int64_t s = 0; s < n; s += kSumChunk) {
    total += exp_sum_chunk<kStore, kNonPositive>(x + s, std::min(kSumChunk, n - s), scale, m,
                                                 out + s,
                                                 next_x == nullptr ? nullptr : next_x + s);
  }
  return static_cast<A>(total);
}

// sum of x[0:n], and of x[0:n] * y[0:n]: four accumulators.
template <typename A>
A row_sum_chunk(const A* x, int64_t n) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  V a0(0), a1(0), a2(0), a3(0);
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    a0 += V::loadu(x + i);
    a1 += V::loadu(x + i + W);
    a2 += V::loadu(x + i + 2 * W);
    a3 += V::loadu(x + i + 3 * W);
  }
  for (; i + W <= n; i += W) a0 += V::loadu(x + i);
  if (i < n) a1 += V::loadu(x + i, n - i);  // loadu with a count zero-fills the other lanes
  return vec_sum((a0 + a1) + (a2 + a3));
}

template <typename A>
A row_dot_chunk(const A* x, const A* y, int64_t n) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  V a0(0), a1(0), a2(0), a3(0);
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    a0 = at::vec::fmadd(V::loadu(x + i), V::loadu(y + i), a0);
    a1 = at::vec::fmadd(V::loadu(x + i + W), V::loadu(y + i + W), a1);
    a2 = at::vec::fmadd(V::loadu(x + i + 2 * W), V::loadu(y + i + 2 * W), a2);
    a3 = at::vec::fmadd(V::loadu(x + i + 3 * W), V::loadu(y + i + 3 * W), a3);
  }
  for (; i + W <= n; i += W) a0 = at::vec::fmadd(V::loadu(x + i), V::loadu(y + i), a0);
  if (i < n) a1 = at::vec::fmadd(V::loadu(x + i, n - i), V::loadu(y + i, n - i), a1);
  return vec_sum((a0 + a1) + (a2 + a3));
}

template <typename A>
A row_sum(const A* x, int64_t n) {
  double total = 0;
  for (int64_t s = 0; s < n; s += kSumChunk) {
    total += row_sum_chunk(x + s, std::min(kSumChunk, n - s));
  }
  return static_cast<A>(total);
}

template <typename A>
A row_dot(const A* x, const A* y, int64_t n) {
  double total = 0;
  for (int64_t s = 0; s < n; s += kSumChunk) {
    total += row_dot_chunk(x + s, y + s, std::min(kSumChunk, n - s));
  }
  return static_cast<A>(total);
}

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
