// Fused cross-entropy forward (+ gradient) on CUDA: the kernel and launch logic of
// fastattn::native_cross_entropy_fwd for CUDA tensors (the CPU one is cross_entropy_cpu.cpp).
// cross_entropy_cuda.cu launches it on a GPU; tests/cuda_emulation/ runs the same code on the
// CPU in an emulation of the CUDA model (tests/test_cuda_emulation.py). Loss, log-sum-exp
// and d(loss)/d(logits) per token, with every option of the contract.
//
// What it computes, per token (a row of C class logits x; w the class weights, 1 without
// weight; eps the label smoothing; z the z-loss coefficient), exactly as
// fastattn.reference.cross_entropy_fwd and the CPU and Triton kernels:
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
// Tokens whose class index is ignore_index get loss 0 and gradient 0. lse follows
// torch.logsumexp (-inf for a row of -inf, +inf with a +inf logit), loss and gradient
// torch.log_softmax (NaN when the max is not finite). Log-probabilities stay max-shifted.
//
// Algorithm: a warp or a block per token (a grid-stride loop over tokens). Sweep 1 reads the
// row once and keeps each thread's online (max, sum of exp) -- so max and sum come from one
// read -- and the sum of v = w (smoothing) or w t' (probability targets); warp shuffles (and a
// block reduction for a block per row) merge them. Every term of the gradient is known after
// sweep 1, so sweep 2 reads the row again (mostly from L2), accumulates sum v (m - u) for the
// loss and writes the gradient once, in the input's dtype, into `grad` (which may be the input
// itself: each element is read before it is overwritten by the same thread, and u_y is read
// before a barrier that precedes sweep 2). The mean's denominator stays on the device (no host
// sync beyond the class-index check). Layouts as softmax_cuda.cuh: Resident<T> and Vector<T>
// (contiguous (tokens, C) logits and gradient of one dtype, class-index targets: 16-byte loads
// and stores, a warp per token for short rows; Resident keeps rows up to 16k float32 / 32k bf16
// logits in registers between the sweeps) and Strided (anything else, one element at a time).
//
// Bytes per token of C classes (b bytes a logit): reads C b once when resident, else twice (the
// second mostly from L2), writes C b of gradient when asked, plus the target probabilities for
// probability targets.
//
// Not yet (not yet run on a GPU in this project): rows longer than the registers held in shared
// memory. Performance is to be measured with the harness on a GPU.

#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/where.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../common/cuda_rows.cuh"
#include "cross_entropy_args.h"

namespace fastattn::cuda::cross_entropy {

// Row tensors (tokens; the row is the class dim): 0 input, 1 target, 2 grad.
struct CrossEntropyArgs {
  DeviceRows rows;
  const void* input;
  int input_dtype;
  const void* target;  // int64 class indices (one per token), or probabilities (a row)
  int target_dtype;
  bool probability;
  const void* weight;  // (C,) contiguous in the accumulation dtype, or null
  void* grad;          // input's dtype, or null
  void* loss;          // (tokens,) accumulation dtype
  float* lse;          // (tokens,)
  const void* denom;  // the mean's denominator (device, accumulation dtype), or null: no scaling
  int64_t ignore_index;
  double one_minus_eps;
  double eps_per_class;
  double z_loss;
  double softcap;  // 0: off
  int threads_per_row;  // 32 (a warp per row) or the block size
};

template <typename A>
__device__ inline A capped(const CrossEntropyArgs& a, A x) {
  if (a.softcap == 0) return x;
  const A cap = static_cast<A>(a.softcap);
  return cap * tanh_acc(x / cap);
}

// v_c = w_c t'_c (probability targets) or w_c (smoothing).
template <typename A>
__device__ inline A v_at(const CrossEntropyArgs& a, const RowOffsets& r, int64_t c) {
  A v = a.weight ? static_cast<const A*>(a.weight)[c] : A(1);
  if (a.probability) {
    A t = load_as<A>(a.target, a.target_dtype, r.off[1] + c * a.rows.col_stride[1]);
    if (a.eps_per_class != 0) {
      t = t * static_cast<A>(a.one_minus_eps) + static_cast<A>(a.eps_per_class);
    }
    v *= t;
  }
  return v;
}

// The two layouts (see softmax_cuda.cuh): Strided (any strides and dtypes, probability
// targets) and Vector<T> (contiguous (tokens, C) logits and gradient of one dtype, class-index
// targets: 16-byte loads and stores). Each gives the row's logits -> gradient access and the
// offset of its target.
struct Strided {
  using Row = StridedRow;
  __device__ static Row row(const CrossEntropyArgs& a, int64_t row, RowOffsets& r) {
    r = row_offsets(a.rows, row);
    return {{a.input, a.input}, {a.input_dtype, a.input_dtype}, {r.off[0], r.off[0]},
            {a.rows.col_stride[0], a.rows.col_stride[0]}, a.grad, a.input_dtype, r.off[2],
            a.rows.col_stride[2]};
  }
};

template <typename T>
struct Vector {
  using Row = VecRow<T>;
  __device__ static Row row(const CrossEntropyArgs& a, int64_t row, RowOffsets& r) {
    r.off[1] = row;  // the target, one index per token
    const T* x = static_cast<const T*>(a.input);
    return {{x, x}, static_cast<T*>(a.grad), row * a.rows.cols};
  }
};

// Vector<T> with the row held in registers between the sweeps (one read of it from memory);
// eight vectors a thread (32 registers of 128): rows up to 16k float32 or 32k bf16 logits.
constexpr int kVecs = 8;

template <typename T>
struct Resident {
  using Row = ResidentRow<T, kVecs>;
  __device__ static Row row(const CrossEntropyArgs& a, int64_t row, RowOffsets& r) {
    return {Vector<T>::row(a, row, r)};
  }
};

template <typename A, typename Layout>
__global__ void __launch_bounds__(kMaxRowThreads) cross_entropy_fwd_kernel(CrossEntropyArgs a) {
  FASTATTN_BLOCK_SHARED A scratch_m[32];
  FASTATTN_BLOCK_SHARED A scratch_s[32];
  FASTATTN_BLOCK_SHARED A scratch_v[32];
  const int64_t C = a.rows.cols;
  const bool smooth = a.eps_per_class != 0;
  const bool need_v = a.probability || smooth;
  const A ome = static_cast<A>(a.one_minus_eps), epsc = static_cast<A>(a.eps_per_class);
  const A zl = static_cast<A>(a.z_loss);
  const A scale = a.denom ? A(1) / *static_cast<const A*>(a.denom) : A(1);
  const RowGroup grp = row_group(a.threads_per_row);
  for (int64_t row = grp.first; row < a.rows.rows; row += grp.step) {
    RowOffsets r{};
    typename Layout::Row x = Layout::row(a, row, r);
    bool valid = true;
    int64_t y = 0;
    if (!a.probability) {
      y = static_cast<const int64_t*>(a.target)[r.off[1]];
      // The launcher has checked every index; the clamp only keeps reads in bounds.
      valid = y != a.ignore_index;
      y = !valid || y < 0 ? 0 : (y >= C ? C - 1 : y);
    }
    const A u_y = capped(a, x.template load<1, A>(0, y));
    // Sweep 1: online max and sum of exp, and sum v.
    MaxSum<A> ms = MaxSum<A>::empty();
    A sum_v = A(0);
    x.template each<1, A>(C, grp.t, grp.nt, [&](int64_t c, A xc, A) {
      ms.add(capped(a, xc));
      if (need_v) sum_v += v_at<A>(a, r, c);
    });
    // u_y is read before the gradient overwrites the logits (grad may be the input itself): a
    // block reduction has a barrier, a warp's shuffles do not order memory.
    if (grp.nt == 32) __syncwarp();
    ms = row_max_sum(ms, grp.nt, scratch_m, scratch_s);
    if (need_v) sum_v = row_sum(sum_v, grp.nt, scratch_v);
    const bool inf_max = isinf(ms.m);
    // The shift: 0 when the max is not finite, so that lse is -inf for a row of -inf and +inf
    // with a +inf logit (torch.logsumexp); then the log-softmax terms are NaN (log_s).
    const A m = inf_max ? A(0) : ms.m;
    const A s = inf_max ? (ms.m > 0 ? A(INFINITY) : A(0)) : ms.s;
    const A lse = m + log_acc(s);
    const A log_s = inf_max ? A(NAN) : log_acc(s);
    A coef, wy_hard = A(0);
    if (a.probability) {
      coef = sum_v;
    } else {
      wy_hard = ome * (a.weight && valid ? static_cast<const A*>(a.weight)[y] : A(1));
      coef = wy_hard + (smooth ? epsc * sum_v : A(0));
    }
    if (zl != 0) coef += A(2) * zl * lse;
    // Sweep 2: sum v (m - u) for the loss, and the gradient.
    const A f = inf_max ? A(NAN) : coef / s;
    A sum_vd = A(0);
    auto grad_at = [&](int64_t c, A xc, A) {
      const A u = capped(a, xc);
      A v = A(0);
      if (need_v) {
        v = v_at<A>(a, r, c);
        sum_vd += v * (m - u);
      }
      A g = A(0);
      if (valid) {
        g = exp_acc(u - m) * f;
        if (a.probability) {
          g -= v;
        } else {
          if (smooth) g -= epsc * v;
          if (c == y) g -= wy_hard;
        }
        g *= scale;
        if (a.softcap != 0) {
          const A q = u / static_cast<A>(a.softcap);
          g *= A(1) - q * q;
        }
      }
      return g;
    };
    if (a.grad != nullptr) {
      x.template map<1, A>(C, grp.t, grp.nt, grad_at);
    } else if (need_v) {
      x.template each<1, A>(C, grp.t, grp.nt, grad_at);
    }
    if (need_v) sum_vd = row_sum(sum_vd, grp.nt, scratch_v);
    if (grp.t == 0) {
      A loss;
      if (a.probability) {
        loss = sum_vd + sum_v * log_s;
      } else {
        loss = wy_hard * ((m - u_y) + log_s);
        if (smooth) loss += epsc * (sum_vd + sum_v * log_s);
      }
      if (zl != 0) loss += zl * lse * lse;
      static_cast<A*>(a.loss)[row] = valid ? loss : A(0);
      a.lse[row] = static_cast<float>(lse);
    }
  }
}

// Launch logic of native_cross_entropy_fwd: checks, the mean's denominator, the kernel, the
// reduction.
template <typename Launcher>
std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_impl(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, int64_t reduction, double label_smoothing, double z_loss,
    double softcap, const std::optional<at::Tensor>& grad) {
  const CrossEntropyInputs in = prepare_cross_entropy(input, target, weight, reduction,
                                                       label_smoothing, z_loss, softcap, grad);
  const int64_t C = in.classes, tokens = in.tokens;
  const bool probability = in.probability;
  const at::ScalarType acc = in.acc;
  const at::Tensor &w = in.w, &t = in.t;
  at::Tensor valid;
  if (!probability) {
    valid = t.ne(ignore_index);
    // One host sync, as fastattn.ops.cross_entropy's own check: a bad index must raise here,
    // not become an out-of-bounds read or a device-side assert.
    const at::Tensor bad = valid.logical_and(t.lt(0).logical_or(t.ge(C)));
    TORCH_CHECK_INDEX(!bad.any().item<bool>(), "target holds a class index outside [0, ", C,
                      ") that is not ignore_index=", ignore_index);  // IndexError, as on CPU
  }
  // The mean's denominator as the specification computes it: a sum in the accumulation dtype of
  // the target classes' weights over non-ignored tokens (their count without weight), or the
  // token count.
  at::Tensor denom;
  if (reduction == 1) {
    if (probability) {
      denom = at::full({}, static_cast<double>(tokens), input.options().dtype(acc));
    } else if (!weight.has_value()) {
      denom = valid.sum().to(acc);
    } else {
      const at::Tensor picked = weight->to(acc).index_select(0, t.clamp(0, C - 1).flatten());
      denom = at::where(valid.flatten(), picked, 0.0).sum();
    }
  }
  const auto opts = input.options().dtype(acc);
  at::Tensor loss = at::empty({tokens}, opts);
  at::Tensor lse = at::empty({tokens}, opts.dtype(at::kFloat));
  if (tokens > 0) {
    cpu::RowLayout layout(input.sizes(), 1);
    layout.add(0, input);
    layout.add(1, probability ? t : t.unsqueeze(1));
    layout.add(2, grad.has_value() ? *grad : at::Tensor());
    CrossEntropyArgs a{};
    a.rows = pack_rows(layout);
    a.input = input.data_ptr();
    a.input_dtype = dtype_code(input.scalar_type());
    a.target = t.data_ptr();
    a.target_dtype = probability ? dtype_code(t.scalar_type()) : kF32;
    a.probability = probability;
    a.weight = w.defined() ? w.data_ptr() : nullptr;
    a.grad = grad.has_value() ? grad->data_ptr() : nullptr;
    a.loss = loss.data_ptr();
    a.lse = lse.data_ptr<float>();
    a.denom = denom.defined() ? denom.const_data_ptr() : nullptr;
    a.ignore_index = ignore_index;
    a.one_minus_eps = 1.0 - label_smoothing;
    a.eps_per_class = label_smoothing / static_cast<double>(C);
    a.z_loss = z_loss;
    a.softcap = softcap;
    std::vector<const at::Tensor*> rows{&input};
    if (grad.has_value()) rows.push_back(&*grad);
    const bool vec = !probability && input.dim() == 2 && t.is_contiguous() &&
                     vec_rows_ok(rows, 1);
    // Resident<T> when the row fits in registers, else Vector<T> (a second read, mostly
    // from L2), else Strided.
    const RowGrid resident =
        vec ? resident_grid(C, input.element_size(), kVecs) : RowGrid{0, 0};
    const RowGrid grid = resident.threads ? resident : row_grid(C, input.element_size(), vec);
    a.threads_per_row = grid.per_row;
    auto go = [&](auto acc_tag, auto layout_tag) {
      using A = decltype(acc_tag);
      Launcher::launch(cross_entropy_fwd_kernel<A, decltype(layout_tag)>,
                       row_blocks<Launcher>(tokens, grid), grid.threads, a);
    };
    auto go_vec = [&](auto acc_tag, auto elem_tag) {
      using T = decltype(elem_tag);
      // float64 streams (twice the registers; it is for checking, not speed)
      if constexpr (std::is_same_v<T, double>) {
        go(acc_tag, Vector<T>());
      } else if (resident.threads) {
        go(acc_tag, Resident<T>());
      } else {
        go(acc_tag, Vector<T>());
      }
    };
    if (!vec) {
      acc == at::kDouble ? go(double(), Strided()) : go(float(), Strided());
    } else {
      switch (input.scalar_type()) {
        case at::kFloat: go_vec(float(), float()); break;
        case at::kDouble: go_vec(double(), double()); break;
        case at::kHalf: go_vec(float(), c10::Half()); break;
        default: go_vec(float(), c10::BFloat16()); break;
      }
    }
  }
  at::Tensor loss_out;
  if (reduction == 0) {
    loss_out = loss.view(in.token_shape);
  } else if (reduction == 2) {
    loss_out = loss.sum();
  } else {
    loss_out = loss.sum().div_(denom);  // 0 / 0 = NaN for a mean over nothing
  }
  return {loss_out, lse.view(in.token_shape)};
}

}  // namespace fastattn::cuda::cross_entropy
