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
// forward reads the row once from memory into a float buffer (z, converted from any dtype and
// stride, masked), then works on the buffer while it sits in L1/L2: max, exp written back to the
// buffer with the sum, and one scaled store into the output. One exp per element, no online
// rescaling needed because the whole row is in the buffer; rows longer than L2 (> 256k fp32)
// spill the buffer to L3. The backward reads g and y once into buffers, reduces, and writes dx.
// 16-bit rows accumulate in float, rows involving float64 in double. exp is at::vec's (Sleef,
// 1 ulp), max and sums are vectorised across lanes and reduced once per row.
//
// Bytes per row of C elements: forward reads C inputs (+ C mask elements for an unbroadcast
// mask) and writes C outputs; backward reads y and g and writes dx.
//
// Not done: causal rows compute the masked tail too (up to 2x the exps of a causal-aware
// kernel); non-unit column strides are gathered element by element.
#pragma once

#include <cmath>
#include <limits>
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

template <typename A>
void fwd_rows(const SoftmaxParams& p, int64_t begin, int64_t end) {
  using V = Vectorized<A>;
  const RowLayout& l = *p.layout;
  const int64_t C = l.cols;
  std::vector<A> zbuf(C), mbuf(p.mask_kind == MaskKind::kAdditive ? C : 0);
  A* z = zbuf.data();
  const A scale = static_cast<A>(p.scale);
  RowCursor cur(l, begin);
  for (int64_t r = begin; r < end; ++r, cur.next()) {
    load_any(p.in[0], p.in_dtype[0], cur.offset(0), l.col_stride[0], C, z);
    if (scale != A(1)) row_scale(z, C, scale);
    const bool any = mask_row(p, cur, 2, C, z, mbuf.data());
    if (!any) {
      const A fill = p.log ? -std::numeric_limits<A>::infinity() : A(0);
      std::fill(z, z + C, fill);
      store_any(z, C, p.out, p.out_dtype, cur.offset(1), 1);
      continue;
    }
    const A m = row_max(z, C);
    const V vm(m);
    V vs(0);
    int64_t i = 0;
    if (p.log) {
      for (; i + V::size() <= C; i += V::size()) vs += fast_exp(V::loadu(z + i) - vm);
      if (i < C) vs += V::set(V(0), fast_exp(V::loadu(z + i, C - i) - vm), C - i);
      const V shift(std::log(vec_sum(vs)));
      for (i = 0; i + V::size() <= C; i += V::size()) {
        ((V::loadu(z + i) - vm) - shift).store(z + i);
      }
      if (i < C) ((V::loadu(z + i, C - i) - vm) - shift).store(z + i, C - i);
    } else {
      for (; i + V::size() <= C; i += V::size()) {
        const V e = fast_exp(V::loadu(z + i) - vm);
        e.store(z + i);
        vs += e;
      }
      if (i < C) {
        const V e = V::set(V(0), fast_exp(V::loadu(z + i, C - i) - vm), C - i);
        e.store(z + i, C - i);
        vs += e;
      }
      row_scale(z, C, A(1) / vec_sum(vs));
    }
    store_any(z, C, p.out, p.out_dtype, cur.offset(1), 1);
  }
}

template <typename A>
void bwd_rows(const SoftmaxParams& p, int64_t begin, int64_t end) {
  using V = Vectorized<A>;
  const RowLayout& l = *p.layout;
  const int64_t C = l.cols;
  std::vector<A> gbuf(C), ybuf(C), mbuf(p.mask_kind == MaskKind::kAdditive ? C : 0);
  A* g = gbuf.data();
  A* y = ybuf.data();
  const V vscale(static_cast<A>(p.scale));
  RowCursor cur(l, begin);
  for (int64_t r = begin; r < end; ++r, cur.next()) {
    load_any(p.in[0], p.in_dtype[0], cur.offset(0), l.col_stride[0], C, g);
    load_any(p.in[1], p.in_dtype[1], cur.offset(1), l.col_stride[1], C, y);
    // The row sum runs over every column, masked ones included, exactly as the composition
    // masked_fill -> (log_)softmax differentiates; masked columns are zeroed afterwards.
    V vt(0);
    int64_t i = 0;
    for (; i + V::size() <= C; i += V::size()) {
      vt += p.log ? V::loadu(g + i) : V::loadu(g + i) * V::loadu(y + i);
    }
    if (i < C) {
      const V gt = V::loadu(g + i, C - i);
      vt += V::set(V(0), p.log ? gt : gt * V::loadu(y + i, C - i), C - i);
    }
    const V total(vec_sum(vt));
    auto grad = [&](const V& gv, const V& yv) {
      return (p.log ? gv - fast_exp(yv) * total : yv * (gv - total)) * vscale;
    };
    for (i = 0; i + V::size() <= C; i += V::size()) {
      grad(V::loadu(g + i), V::loadu(y + i)).store(g + i);
    }
    if (i < C) grad(V::loadu(g + i, C - i), V::loadu(y + i, C - i)).store(g + i, C - i);
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
