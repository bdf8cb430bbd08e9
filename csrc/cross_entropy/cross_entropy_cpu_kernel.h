// Fused cross-entropy forward (+ gradient) on CPU: loss, log-sum-exp and d(loss)/d(logits), for
// one CPU capability (compiled by cross_entropy_cpu_{default,avx2,avx512}.cpp; the launcher is
// cross_entropy_cpu.cpp).
//
// What it computes, per token (a row of C class logits x; w the class weights, 1 without
// weight; eps the label smoothing; z the z-loss coefficient), exactly as
// fastattn.reference.cross_entropy_fwd and fastattn/triton/cross_entropy.py:
//
//     u_c   = softcap * tanh(x_c / softcap)                  (u = x when softcap is off)
//     m     = max_c u_c,  s = sum_c exp(u_c - m),  lse = m + log(s),  -log p_c = (m - u_c) + log(s)
//     class index y:
//       loss  = (1-eps) w_y (-log p_y) + eps/C sum_c w_c (-log p_c) + z lse^2
//       dl/du = p_c ((1-eps) w_y + eps/C W + 2 z lse) - (1-eps) w_y [c=y] - eps/C w_c
//     probabilities t, t'_c = (1-eps) t_c + eps/C:
//       loss  = sum_c w_c t'_c (-log p_c) + z lse^2
//       dl/du = p_c (sum_c w_c t'_c + 2 z lse) - w_c t'_c
//     grad_c = dl/du_c * (1 - (u_c / softcap)^2 if softcap) * (1 / denominator if mean)
//
// Tokens whose class index is ignore_index get loss 0 and gradient 0 (selected, never multiplied
// by 0, so inf/NaN in an ignored row cannot leak). lse follows torch.logsumexp (-inf for a row
// of -inf, +inf with a +inf logit), loss and gradient torch.log_softmax (NaN when the max is not
// finite). Log-probabilities stay max-shifted: u - lse would cancel digits when |u| is large.
//
// Algorithm: one token at a time per thread, three sweeps over the row, one exp an element.
// float32 logits with contiguous rows are read where they lie; other dtypes, strides and
// softcapped rows are first read into a float buffer (and soft-capped there). Max (this sweep
// brings the row from memory; the next ones find it in L1/L2); one sweep computes exp(u - m),
// stored when a gradient is wanted, its sum and, for smoothing or probability targets, sum v and
// sum v (m - u) with v = w or w t'; the gradient sweep then needs no second exp and writes the
// gradient once. With contiguous fp32 rows exp(u - m) and then the gradient are written straight
// into `grad` (which may be the input itself: every element is read before it is overwritten),
// otherwise into a buffer stored in the input's dtype. 16-bit and fp32 logits accumulate in
// float, fp64 in double.
//
// Bytes per token of C classes (b bytes a logit): reads C b, writes C b of gradient when asked,
// plus C target probabilities for probability targets; the weights are shared by every token.
//
// Not supported: C == 0 (rejected by the launcher); the gradient for probability targets (the
// autograd layer computes it).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/vec_rows.h"
#include "cross_entropy.h"

namespace fastattn::cpu::CPU_CAPABILITY {

namespace {

template <typename A>
void fwd_rows(const CrossEntropyParams& p, int64_t begin, int64_t end) {
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  const RowLayout& l = *p.layout;
  const int64_t C = l.cols;
  const bool grad = p.grad != nullptr;
  const bool softcap = p.softcap != 0;
  const bool smooth = p.eps_per_class != 0;
  const bool need_v = p.probability || smooth;  // sum v and sum v (m - u)
  const A* w = static_cast<const A*>(p.weight);
  const A cap = static_cast<A>(softcap ? p.softcap : 1.0);
  const A ome = static_cast<A>(p.one_minus_eps), epsc = static_cast<A>(p.eps_per_class);
  const A zl = static_cast<A>(p.z_loss), scale = static_cast<A>(p.grad_scale);
  constexpr A kNaN = std::numeric_limits<A>::quiet_NaN();

  // float32 logits with contiguous rows are read where they lie, and the gradient, when its
  // rows are contiguous too, is built in place in `grad` (exp(u - m) first, then the gradient
  // over it); anything else goes through float (double) buffers. Softcapped logits are always
  // buffered: the gradient sweep needs u after `grad`, which may be the input, is overwritten.
  constexpr bool kFloat = std::is_same_v<A, float>;
  const bool is_f32 = kFloat && p.input_dtype == c10::ScalarType::Float;
  const bool in_direct = is_f32 && l.unit_cols(0) && !softcap;
  const bool out_direct = grad && is_f32 && l.unit_cols(2);
  std::vector<A> ubuf(in_direct ? 0 : C), tbuf(p.probability ? C : 0);
  std::vector<A> ebuf(grad && !out_direct && (softcap || in_direct) ? C : 0);
  A* t = tbuf.data();
  A* loss_out = static_cast<A*>(p.loss);

  // v = w t' (probabilities) or w (smoothing), masked to the first n lanes.
  auto v_of = [&](int64_t i, int64_t n) {
    V v = w ? V::loadu(w + i, n) : V(A(1));
    if (p.probability) {
      V tv = V::loadu(t + i, n);
      if (smooth) tv = tv * V(ome) + V(epsc);
      v = v * tv;
    }
    return n == W ? v : V::set(V(0), v, n);
  };

  RowCursor cur(l, begin);
  // One row ahead, for the prefetches of exp_sum (rows read and written where they lie only).
  RowCursor ahead(l, std::min(begin + 1, end - 1));
  for (int64_t r = begin; r < end; ++r, cur.next(), ahead.next()) {
    bool valid = true;
    int64_t y = 0;
    if (!p.probability) {
      y = static_cast<const int64_t*>(p.target)[cur.offset(1)];
      valid = y != p.ignore_index;
      y = valid ? y : 0;
    } else {
      load_any(p.target, p.target_dtype, cur.offset(1), l.col_stride[1], C, t);
    }
    const A* u;
    if (in_direct) {
      u = reinterpret_cast<const A*>(static_cast<const float*>(p.input) + cur.offset(0));
    } else {
      load_any(p.input, p.input_dtype, cur.offset(0), l.col_stride[0], C, ubuf.data());
      u = ubuf.data();
    }
    if (softcap) {
      A* uc = ubuf.data();
      const V vcap(cap);
      int64_t i = 0;
      for (; i + W <= C; i += W) (vcap * (V::loadu(uc + i) / vcap).tanh()).store(uc + i);
      if (i < C) (vcap * (V::loadu(uc + i, C - i) / vcap).tanh()).store(uc + i, C - i);
    }
    // exp(u - m), when a gradient is wanted: the gradient's own row, else a buffer (u's when u
    // is not needed again).
    A* e = nullptr;
    if (out_direct) {
      e = reinterpret_cast<A*>(static_cast<float*>(p.grad) + cur.offset(2));
    } else if (grad) {
      e = ebuf.empty() ? ubuf.data() : ebuf.data();
    }
    const A u_y = u[y];
    const A m = row_max(u, C);
    // exp(u - m) is NaN when m is +-inf and u == m; 0 keeps -inf rows at s = 0 (lse = -inf)
    // and makes a +inf logit give s = inf (lse = +inf, as torch.logsumexp).
    const A ms = std::isinf(m) ? A(0) : m;
    const V vms(ms);
    A s, sum_v = 0, sum_vd = 0;
    if (!need_v) {
      // The common case, one sweep: u is read, exp(u - m) summed and kept for the gradient.
      // u - ms <= 0 unless the max is infinite (ms = 0 then, and exp(+inf) must be inf).
      const bool more = r + 1 < end;
      const A* next_u = more && in_direct ? reinterpret_cast<const A*>(
          static_cast<const float*>(p.input) + ahead.offset(0)) : nullptr;
      if (std::isinf(m)) {
        s = grad ? exp_sum<true, false>(u, C, A(1), ms, e, next_u)
                 : exp_sum<false, false>(u, C, A(1), ms, e, next_u);
      } else {
        s = grad ? exp_sum<true>(u, C, A(1), ms, e, next_u)
                 : exp_sum<false>(u, C, A(1), ms, e, next_u);
      }
    } else {
      V vs(0), vsv(0), vsvd(0);
      for (int64_t i = 0; i < C; i += W) {
        const int64_t n = std::min<int64_t>(W, C - i);
        const V uv = V::loadu(u + i, n);
        V ev = fast_exp(uv - vms);
        if (n < W) ev = V::set(V(0), ev, n);
        vs += ev;
        const V v = v_of(i, n);
        vsv += v;
        // Lanes past the row end have v = 0 and u = 0: they add 0.
        vsvd += v * (vms - uv);
        if (grad) ev.store(e + i, n);
      }
      s = vec_sum(vs);
      sum_v = vec_sum(vsv);
      sum_vd = vec_sum(vsvd);
    }
    const A log_s_exact = std::log(s);
    const A lse = ms + log_s_exact;
    // torch.logsumexp semantics for lse, torch.log_softmax semantics (NaN when the max is not
    // finite) for loss and gradient.
    const A log_s = std::isinf(m) ? kNaN : log_s_exact;
    A loss, coef, wy_hard = 0;
    if (p.probability) {
      loss = sum_vd + sum_v * log_s;
      coef = sum_v;
    } else {
      wy_hard = ome * (w && valid ? w[y] : A(1));
      loss = wy_hard * ((ms - u_y) + log_s);
      coef = wy_hard;
      if (smooth) {
        loss += epsc * (sum_vd + sum_v * log_s);
        coef += epsc * sum_v;
      }
    }
    if (zl != 0) {
      loss += zl * lse * lse;
      coef += A(2) * zl * lse;
    }
    loss_out[r] = valid ? loss : A(0);
    p.lse[r] = static_cast<float>(lse);
    if (!grad) continue;
    if (!valid) {
      std::fill(e, e + C, A(0));
    } else {
      // dl/du_c = p_c coef - (v terms) - [c = y] wy_hard, with p_c coef = exp(u_c - m) (coef / s)
      // (NaN when the max is not finite, as log_s); times the mean's 1/denominator and the
      // softcap's derivative. One sweep over e, in place; class y is redone afterwards with
      // its one-hot term, from exp(u_y - m) read before the sweep.
      const A f = std::isinf(m) ? kNaN : coef / s;
      const V vf(f), vscale(scale), vcap(cap), vepsc(epsc);
      const A e_y = e[y];
      auto grad_of = [&](const V& ev, int64_t i, int64_t n) {
        V g = ev * vf;
        if (p.probability) {
          g = g - v_of(i, n);
        } else if (smooth) {
          g = g - vepsc * (w ? V::loadu(w + i, n) : V(A(1)));
        }
        g = g * vscale;
        if (softcap) {
          const V rc = V::loadu(u + i, n) / vcap;
          g = g * (V(A(1)) - rc * rc);
        }
        return g;
      };
      int64_t i = 0;
      if (!p.probability && !smooth && !softcap) {
        const V vfs(f * scale);
        for (; i + W <= C; i += W) (V::loadu(e + i) * vfs).store(e + i);
      }
      for (; i < C; i += W) {
        const int64_t n = std::min<int64_t>(W, C - i);
        grad_of(V::loadu(e + i, n), i, n).store(e + i, n);
      }
      if (!p.probability) {
        A g = e_y * f;
        if (smooth) g -= epsc * (w ? w[y] : A(1));
        g = (g - wy_hard) * scale;
        if (softcap) g *= A(1) - (u[y] / cap) * (u[y] / cap);
        e[y] = g;
      }
    }
    if (!out_direct) store_any(e, C, p.grad, p.input_dtype, cur.offset(2), l.col_stride[2]);
  }
}

}  // namespace

void cross_entropy_fwd_rows(const CrossEntropyParams& p, int64_t begin, int64_t end) {
  p.acc_double ? fwd_rows<double>(p, begin, end) : fwd_rows<float>(p, begin, end);
}

}  // namespace fastattn::cpu::CPU_CAPABILITY
