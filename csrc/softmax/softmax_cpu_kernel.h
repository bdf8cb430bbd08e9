// Fused scale + mask + (log-)softmax on CPU, forward and backward, for one CPU capability
// (compiled by softmax_cpu_{default,avx2,avx512}.cpp; the launcher is softmax_cpu.cpp).
//
// What it computes, per row (the reduced dim of any strided input), as
// fastattn/triton/softmax.py and the specification in fastattn/reference.py:
//
//     z_c  = x_c * scale (+ mask_c if the mask is additive)        masked elements: z_c = -inf
//     y_c  = exp(z_c - m) / s      or, for log-softmax,  y_c = (z_c - m) - log(s)
//     m    = max_c z_c,  s = sum_c exp(z_c - m)
//     backward, g = dL/dy:
//     dx_c = scale * y_c (g_c - sum_j g_j y_j)                      (softmax)
//     dx_c = scale * (g_c - exp(y_c) sum_j g_j)                     (log-softmax)
//     dx_c = 0 where element c is masked
//
// Masked: bool mask False, additive mask -inf, or (causal) column > index of the row along the
// second-to-last dim. A row with every element masked gives 0 (softmax) or -inf (log-softmax)
// and zero gradient; other rows behave as torch.softmax on the unmasked values, inf and NaN
// included (a NaN or +inf makes the row NaN, a row of only -inf values is NaN).
//
// Algorithm: one row at a time per thread (at::parallel_for over rows in the launcher). The
// forward makes three sweeps over a row, with one exp an element: max; exp(x * scale - m)
// written to the output with its sum; the output times 1/s (log-softmax: the sum alone, then
// (x * scale - m) - log s). The backward makes two: sum g y (or sum g), then one sweep writing
// dx. The first sweep brings the row from memory and the others find it in L1/L2, so a row is
// read from memory once and written once. float32 rows that are contiguous and unmasked are
// worked on in place, in the tensors themselves; every other row (16-bit or float64 dtypes,
// strides, masks, causal) is first read into a float (double) buffer, converted, scaled and
// masked, and written back converted, which costs two more sweeps over the buffer. exp is
// fast_exp (csrc/common/vec_rows.h, under 1 ulp; the exp is most of the forward's time), sums
// and maxima use four vector accumulators and reduce across lanes once a row.
//
// Bytes per row of C elements: forward reads C inputs (+ C mask elements for an unbroadcast
// mask) and writes C outputs; backward reads y and g and writes dx.
//
// Not done: causal rows compute the masked tail too (up to 2x the exps of a causal-aware
// kernel); non-unit column strides are gathered element by element.
#pragma once

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/vec_rows.h"
#include "softmax.h"

namespace fastattn::cpu::CPU_CAPABILITY {

namespace {

// Apply the mask and the causal limit to z in place; returns whether any element is kept.
// `mbuf` receives the additive mask row.
template <typename A>
bool mask_row(const SoftmaxParams& p, const RowCursor& cur, int mask_slot, int64_t C, A* z,
              A* mbuf) {
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  // Causal: columns [0, limit) may take part; the rest are masked.
  const int64_t limit = p.causal ? std::min(cur.inner_index() + 1, C) : C;
  bool any = false;
  if (p.mask_kind == MaskKind::kAdditive) {
    load_any(p.mask, p.mask_dtype, cur.offset(mask_slot), p.layout->col_stride[mask_slot], C,
             mbuf);
    using V = Vectorized<A>;
    int64_t i = 0;
    for (; i + V::size() <= C; i += V::size()) {
      (V::loadu(z + i) + V::loadu(mbuf + i)).store(z + i);
    }
    for (; i < C; ++i) z[i] += mbuf[i];
    for (int64_t j = 0; j < limit && !any; ++j) any = mbuf[j] != kNegInf;
  } else if (p.mask_kind == MaskKind::kBool) {
    const auto* m = static_cast<const uint8_t*>(p.mask) + cur.offset(mask_slot);
    const int64_t ms = p.layout->col_stride[mask_slot];
    for (int64_t j = 0; j < C; ++j) {
      const bool keep = m[j * ms] != 0;
      z[j] = keep ? z[j] : kNegInf;
      any |= keep && j < limit;
    }
  } else {
    any = limit > 0;
  }
  for (int64_t j = limit; j < C; ++j) z[j] = kNegInf;
  return any;
}

// Zero dx where the mask (or the causal limit) masks the element.
template <typename A>
void zero_masked(const SoftmaxParams& p, const RowCursor& cur, int mask_slot, int64_t C, A* dx,
                 A* mbuf) {
  const int64_t limit = p.causal ? std::min(cur.inner_index() + 1, C) : C;
  if (p.mask_kind == MaskKind::kAdditive) {
    load_any(p.mask, p.mask_dtype, cur.offset(mask_slot), p.layout->col_stride[mask_slot], C,
             mbuf);
    for (int64_t j = 0; j < C; ++j) {
      dx[j] = mbuf[j] == -std::numeric_limits<A>::infinity() ? A(0) : dx[j];
    }
  } else if (p.mask_kind == MaskKind::kBool) {
    const auto* m = static_cast<const uint8_t*>(p.mask) + cur.offset(mask_slot);
    const int64_t ms = p.layout->col_stride[mask_slot];
    for (int64_t j = 0; j < C; ++j) dx[j] = m[j * ms] != 0 ? dx[j] : A(0);
  }
  for (int64_t j = limit; j < C; ++j) dx[j] = A(0);
}

// y[0:C] = softmax(x[0:C] * scale), or log-softmax: three sweeps, one exp an element. Max;
// exp(x * scale - m) written to y with its sum; y *= 1/s (log-softmax: the sum alone, then
// y = (x * scale - m) - log s, max-shifted so large |x| does not cancel digits). y may be x.
// next_x (may be null): the next row, asked into L2 during the exp sweep (exp_sum).
template <typename A>
void softmax_row(const A* x, A* y, int64_t C, A scale, bool log, const A* next_x = nullptr) {
  using V = Vectorized<A>;
  const A m = row_max(x, C, scale);
  if (log) {
    const V vs(scale), vm(m), shift(std::log(exp_sum<false>(x, C, scale, m, y, next_x)));
    int64_t i = 0;
    for (; i + V::size() <= C; i += V::size()) {
      (at::vec::fmsub(V::loadu(x + i), vs, vm) - shift).store(y + i);
    }
    if (i < C) (at::vec::fmsub(V::loadu(x + i, C - i), vs, vm) - shift).store(y + i, C - i);
  } else {
    row_scale(y, C, A(1) / exp_sum<true>(x, C, scale, m, y, next_x));
  }
}

// dx[0:C] = scale * y (g - sum g y), or for log-softmax scale * (g - exp(y) sum g): the sum,
// then one sweep writing dx (which may be g). next_g, next_y (null or both set): the next row's,
// asked into L2 during the writing sweep, which reads only what the first sweep brought in.
template <typename A>
void softmax_bwd_row(const A* g, const A* y, A* dx, int64_t C, A scale, bool log,
                     const A* next_g = nullptr, const A* next_y = nullptr) {
  using V = Vectorized<A>;
  // The row sum runs over every column, masked ones included, exactly as the composition
  // masked_fill -> (log_)softmax differentiates; masked columns are zeroed afterwards.
  const V total(log ? row_sum(g, C) : row_dot(g, y, C));
  const V vscale(scale);
  auto grad = [&](const V& gv, const V& yv) {
    const V d = log ? gv - fast_exp(yv) * total : yv * (gv - total);
    return scale == A(1) ? d : d * vscale;
  };
  constexpr int64_t kLine = 64 / sizeof(A);
  int64_t i = 0;
  for (; i + V::size() <= C; i += V::size()) {
    if (next_g != nullptr && i % kLine == 0) {
      __builtin_prefetch(next_g + i, 0, 2);
      __builtin_prefetch(next_y + i, 0, 2);
    }
    grad(V::loadu(g + i), V::loadu(y + i)).store(dx + i);
  }
  if (i < C) grad(V::loadu(g + i, C - i), V::loadu(y + i, C - i)).store(dx + i, C - i);
}

// softmax_bwd_row for 16-bit rows (g, y and dx all of dtype T, contiguous), converting to float
// in registers: the same two sweeps, without the float buffers' three extra ones.
template <typename T>
void softmax_bwd_row_16(const T* g, const T* y, T* dx, int64_t C, float scale, bool log) {
  using V = Vectorized<float>;
  using VT = Vectorized<T>;  // twice V's lanes
  constexpr int64_t WT = VT::size();
  V a0(0), a1(0);
  int64_t i = 0;
  for (; i + WT <= C; i += WT) {
    auto [g0, g1] = at::vec::convert_to_float<T>(VT::loadu(g + i));
    if (log) {
      a0 += g0;
      a1 += g1;
    } else {
      auto [y0, y1] = at::vec::convert_to_float<T>(VT::loadu(y + i));
      a0 = at::vec::fmadd(g0, y0, a0);
      a1 = at::vec::fmadd(g1, y1, a1);
    }
  }
  float total = vec_sum(a0 + a1);
  for (int64_t j = i; j < C; ++j) {
    total += log ? static_cast<float>(g[j]) : static_cast<float>(g[j]) * static_cast<float>(y[j]);
  }
  const V vt(total), vscale(scale);
  auto grad = [&](const V& gv, const V& yv) {
    return (log ? gv - fast_exp(yv) * vt : yv * (gv - vt)) * vscale;
  };
  for (i = 0; i + WT <= C; i += WT) {
    auto [g0, g1] = at::vec::convert_to_float<T>(VT::loadu(g + i));
    auto [y0, y1] = at::vec::convert_to_float<T>(VT::loadu(y + i));
    at::vec::convert_from_float<T>(grad(g0, y0), grad(g1, y1)).store(dx + i);
  }
  for (; i < C; ++i) {
    const float gv = static_cast<float>(g[i]), yv = static_cast<float>(y[i]);
    dx[i] = static_cast<T>((log ? gv - std::exp(yv) * total : yv * (gv - total)) * scale);
  }
}

// Whether the rows of tensor `slot` are float and contiguous, so the kernels work on the tensor
// itself instead of a converted copy.
inline bool direct(const SoftmaxParams& p, c10::ScalarType dtype, int slot) {
  return !p.acc_double && dtype == c10::ScalarType::Float && p.layout->unit_cols(slot);
}

template <typename A>
void fwd_rows(const SoftmaxParams& p, int64_t begin, int64_t end) {
  const RowLayout& l = *p.layout;
  const int64_t C = l.cols;
  const A scale = static_cast<A>(p.scale);
  RowCursor cur(l, begin);
  if constexpr (std::is_same_v<A, float>) {
    if (p.mask_kind == MaskKind::kNone && !p.causal && direct(p, p.in_dtype[0], 0) &&
        direct(p, p.out_dtype, 1)) {
      const float* x = static_cast<const float*>(p.in[0]);
      float* y = static_cast<float*>(p.out);
      RowCursor ahead(l, std::min(begin + 1, end - 1));  // for softmax_row's prefetch
      for (int64_t r = begin; r < end; ++r, cur.next(), ahead.next()) {
        softmax_row(x + cur.offset(0), y + cur.offset(1), C, scale, p.log,
                    r + 1 < end ? x + ahead.offset(0) : nullptr);
      }
      return;
    }
  }
  std::vector<A> zbuf(C), mbuf(p.mask_kind == MaskKind::kAdditive ? C : 0);
  A* z = zbuf.data();
  for (int64_t r = begin; r < end; ++r, cur.next()) {
    load_any(p.in[0], p.in_dtype[0], cur.offset(0), l.col_stride[0], C, z);
    if (scale != A(1)) row_scale(z, C, scale);
    if (!mask_row(p, cur, 2, C, z, mbuf.data())) {
      const A fill = p.log ? -std::numeric_limits<A>::infinity() : A(0);
      std::fill(z, z + C, fill);
    } else {
      softmax_row(z, z, C, A(1), p.log);
    }
    store_any(z, C, p.out, p.out_dtype, cur.offset(1), 1);
  }
}

template <typename A>
void bwd_rows(const SoftmaxParams& p, int64_t begin, int64_t end) {
  const RowLayout& l = *p.layout;
  const int64_t C = l.cols;
  const A scale = static_cast<A>(p.scale);
  RowCursor cur(l, begin);
  if constexpr (std::is_same_v<A, float>) {
    if (p.mask_kind == MaskKind::kNone && !p.causal && direct(p, p.in_dtype[0], 0) &&
        direct(p, p.in_dtype[1], 1) && direct(p, p.out_dtype, 2)) {
      const float* g = static_cast<const float*>(p.in[0]);
      const float* y = static_cast<const float*>(p.in[1]);
      float* dx = static_cast<float*>(p.out);
      RowCursor ahead(l, std::min(begin + 1, end - 1));  // for softmax_bwd_row's prefetch
      for (int64_t r = begin; r < end; ++r, cur.next(), ahead.next()) {
        const bool more = r + 1 < end;
        softmax_bwd_row(g + cur.offset(0), y + cur.offset(1), dx + cur.offset(2), C, scale,
                        p.log, more ? g + ahead.offset(0) : nullptr,
                        more ? y + ahead.offset(1) : nullptr);
      }
      return;
    }
  }
  if constexpr (std::is_same_v<A, float>) {
    const auto t = p.in_dtype[0];
    if ((t == c10::ScalarType::BFloat16 || t == c10::ScalarType::Half) && p.in_dtype[1] == t &&
        p.out_dtype == t && p.mask_kind == MaskKind::kNone && !p.causal &&
        l.unit_cols(0) && l.unit_cols(1) && l.unit_cols(2)) {
      with_float_type(t, [&](auto* tag) {
        using T = std::remove_pointer_t<decltype(tag)>;
        if constexpr (kIsReduced<T>) {
          const T* g = static_cast<const T*>(p.in[0]);
          const T* y = static_cast<const T*>(p.in[1]);
          T* dx = static_cast<T*>(p.out);
          for (int64_t r = begin; r < end; ++r, cur.next()) {
            softmax_bwd_row_16(g + cur.offset(0), y + cur.offset(1), dx + cur.offset(2), C,
                               scale, p.log);
          }
        }
      });
      return;
    }
  }
  std::vector<A> gbuf(C), ybuf(C), mbuf(p.mask_kind == MaskKind::kAdditive ? C : 0);
  A* g = gbuf.data();
  A* y = ybuf.data();
  for (int64_t r = begin; r < end; ++r, cur.next()) {
    load_any(p.in[0], p.in_dtype[0], cur.offset(0), l.col_stride[0], C, g);
    load_any(p.in[1], p.in_dtype[1], cur.offset(1), l.col_stride[1], C, y);
    softmax_bwd_row(g, y, g, C, scale, p.log);
    zero_masked(p, cur, 3, C, g, mbuf.data());
    store_any(g, C, p.out, p.out_dtype, cur.offset(2), 1);
  }
}

}  // namespace

void softmax_fwd_rows(const SoftmaxParams& p, int64_t begin, int64_t end) {
  p.acc_double ? fwd_rows<double>(p, begin, end) : fwd_rows<float>(p, begin, end);
}

void softmax_bwd_rows(const SoftmaxParams& p, int64_t begin, int64_t end) {
  p.acc_double ? bwd_rows<double>(p, begin, end) : bwd_rows<float>(p, begin, end);
}

}  // namespace fastattn::cpu::CPU_CAPABILITY
