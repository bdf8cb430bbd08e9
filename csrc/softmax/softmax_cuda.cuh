// Fused scale + mask + (log-)softmax on CUDA, forward and backward: the kernels and launch logic
// of fastattn::native_softmax_fwd / native_softmax_bwd for CUDA tensors (the CPU ones are
// softmax_cpu.cpp). softmax_cuda.cu launches them on a GPU; tests/cuda_emulation/ runs the same
// code on the CPU in an emulation of the CUDA model (tests/test_cuda_emulation.py).
//
// What it computes, per row (the reduced dim of any strided input), as the specification
// fastattn.reference.softmax_fwd / softmax_bwd and the CPU and Triton kernels:
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
// and zero gradient; other rows behave as torch.softmax on the unmasked values (a NaN or +inf
// makes the row NaN, a row whose kept values are all -inf is NaN).
//
// Algorithm: one block per row (a grid-stride loop over rows), each thread a strided slice of
// the columns. Forward: one sweep keeps each thread's running (max, sum of exp) -- the online
// softmax, so one read of the row gives both statistics -- merged across the block with warp
// shuffles; a second sweep recomputes z (from L2 for rows that fit) and writes y. Backward: one
// sweep for the row sum, one to write dx. Loads and stores convert any of the four float dtypes
// (and bool masks) to the accumulation type: float for 16-bit and float32 rows, double when a
// float64 tensor is involved. Offsets are 64-bit; every tensor is read through its own strides
// (broadcast masks with stride 0), so nothing is expanded in memory.
//
// Bytes per row of C elements: forward reads C (twice, the second time mostly from L2) and
// writes C; backward reads y and g twice and writes dx; plus the mask where it is not broadcast.
//
// Not yet (first CUDA version, not yet run on a GPU in this project): 16-byte vector loads,
// rows held in registers between the two sweeps, a warp-per-row path for short rows, skipping
// the masked causal tail. Performance is to be measured with the harness on a GPU.

#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "../common/cuda_rows.cuh"
#include "softmax_args.h"

namespace fastattn::cuda::softmax {

enum MaskKind : int { kNoMask = 0, kBoolMask = 1, kAdditiveMask = 2 };

struct SoftmaxArgs {
  DeviceRows rows;  // fwd: 0 input, 1 output, 2 mask; bwd: 0 grad_output, 1 output, 2 dx, 3 mask
  const void* in0;
  int in0_dtype;
  const void* in1;
  int in1_dtype;
  void* out;
  int out_dtype;
  const void* mask;
  int mask_dtype;
  int mask_kind;
  int mask_slot;
  double scale;
  bool causal;
  bool log;
};

// Whether element j of the row takes part (mask and causal limit), and the additive mask value.
template <typename A>
__device__ inline bool keep_at(const SoftmaxArgs& a, const RowOffsets& r, int64_t j,
                               int64_t limit, A& add) {
  add = A(0);
  bool keep = j < limit;
  if (a.mask_kind == kNoMask) return keep;
  const int64_t mi = r.off[a.mask_slot] + j * a.rows.col_stride[a.mask_slot];
  if (a.mask_kind == kBoolMask) return keep && load_as<A>(a.mask, kU8, mi) != A(0);
  add = load_as<A>(a.mask, a.mask_dtype, mi);
  return keep && add != -INFINITY;
}

// z_j: the scaled (and mask-added) input, -inf where masked.
template <typename A>
__device__ inline A z_at(const SoftmaxArgs& a, const RowOffsets& r, int64_t j, int64_t limit,
                         bool& keep) {
  A add;
  keep = keep_at<A>(a, r, j, limit, add);
  const A x = load_as<A>(a.in0, a.in0_dtype, r.off[0] + j * a.rows.col_stride[0]);
  return keep ? x * static_cast<A>(a.scale) + add : A(-INFINITY);
}

template <typename A>
__global__ void softmax_fwd_kernel(SoftmaxArgs a) {
  FASTATTN_BLOCK_SHARED A scratch_m[32];
  FASTATTN_BLOCK_SHARED A scratch_s[32];
  FASTATTN_BLOCK_SHARED A scratch_any[32];
  const int64_t C = a.rows.cols;
  for (int64_t row = blockIdx.x; row < a.rows.rows; row += gridDim.x) {
    const RowOffsets r = row_offsets(a.rows, row);
    const int64_t limit = a.causal ? std::min<int64_t>(r.inner + 1, C) : C;
    MaxSum<A> ms = MaxSum<A>::empty();
    A any = A(0);
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      bool keep;
      const A z = z_at<A>(a, r, j, limit, keep);
      any += keep ? A(1) : A(0);
      ms.add(z);
    }
    ms = block_max_sum(ms, scratch_m, scratch_s);
    any = block_sum(any, scratch_any);
    const int64_t out_row = r.off[1];  // the output's rows are contiguous
    if (any == A(0)) {
      const A fill = a.log ? A(-INFINITY) : A(0);
      for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
        store_as(a.out, a.out_dtype, out_row + j, fill);
      }
      continue;
    }
    // m = -inf, s = 0 when every kept value is -inf: exp(-inf - -inf) = NaN, as torch.softmax.
    const A log_s = log_acc(ms.s);
    const A inv_s = A(1) / ms.s;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      bool keep;
      const A z = z_at<A>(a, r, j, limit, keep);
      const A y = a.log ? (z - ms.m) - log_s : exp_acc(z - ms.m) * inv_s;
      store_as(a.out, a.out_dtype, out_row + j, y);
    }
  }
}

template <typename A>
__global__ void softmax_bwd_kernel(SoftmaxArgs a) {
  FASTATTN_BLOCK_SHARED A scratch[32];
  const int64_t C = a.rows.cols;
  const int64_t gs = a.rows.col_stride[0], ys = a.rows.col_stride[1];
  for (int64_t row = blockIdx.x; row < a.rows.rows; row += gridDim.x) {
    const RowOffsets r = row_offsets(a.rows, row);
    const int64_t limit = a.causal ? std::min<int64_t>(r.inner + 1, C) : C;
    // The row sum runs over every column, masked ones included, exactly as the composition
    // masked_fill -> (log_)softmax differentiates; masked columns are zeroed afterwards.
    A t = A(0);
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      const A g = load_as<A>(a.in0, a.in0_dtype, r.off[0] + j * gs);
      t += a.log ? g : g * load_as<A>(a.in1, a.in1_dtype, r.off[1] + j * ys);
    }
    t = block_sum(t, scratch);
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      const A g = load_as<A>(a.in0, a.in0_dtype, r.off[0] + j * gs);
      const A y = load_as<A>(a.in1, a.in1_dtype, r.off[1] + j * ys);
      A add;
      const bool keep = keep_at<A>(a, r, j, limit, add);
      const A dz = a.log ? g - exp_acc(y) * t : y * (g - t);
      store_as(a.out, a.out_dtype, r.off[2] + j, keep ? dz * static_cast<A>(a.scale) : A(0));
    }
  }
}

inline int mask_kind_of(const at::Tensor& mask_view) {
  if (!mask_view.defined()) return kNoMask;
  return mask_view.scalar_type() == at::kBool ? kBoolMask : kAdditiveMask;
}

template <typename Launcher>
void launch(void (*kernel)(SoftmaxArgs), const SoftmaxArgs& a) {
  Launcher::launch(kernel, row_blocks<Launcher>(a.rows.rows), threads_for(a.rows.cols), a);
}

// Launch logic of native_softmax_fwd: checks, the output, the row layout, the kernel.
template <typename Launcher>
at::Tensor softmax_fwd_impl(const at::Tensor& input, int64_t dim, double scale,
                            const std::optional<at::Tensor>& mask, bool causal, bool log,
                            at::ScalarType out_dtype) {
  check_kernel_float(input.scalar_type(), "input");
  check_kernel_float(out_dtype, "out_dtype");
  at::Tensor mask_view;
  dim = check_softmax_args(input, "input", dim, mask, causal, scale, mask_view);
  const at::Tensor x = input.dim() == 0 ? input.reshape({1}) : input;
  if (input.dim() == 0 && mask_view.defined()) mask_view = mask_view.reshape({1});
  at::Tensor out = softmax_row_output(x, dim, out_dtype);
  if (x.numel() > 0) {
    cpu::RowLayout layout(x.sizes(), dim);
    layout.add(0, x);
    layout.add(1, out);
    layout.add(2, mask_view);
    SoftmaxArgs a{};
    a.rows = pack_rows(layout);
    a.in0 = x.data_ptr();
    a.in0_dtype = dtype_code(x.scalar_type());
    a.out = out.data_ptr();
    a.out_dtype = dtype_code(out_dtype);
    a.mask = mask_view.defined() ? mask_view.data_ptr() : nullptr;
    a.mask_dtype = mask_view.defined() ? dtype_code(mask_view.scalar_type()) : kF32;
    a.mask_kind = mask_kind_of(mask_view);
    a.mask_slot = 2;
    a.scale = scale;
    a.causal = causal;
    a.log = log;
    if (x.scalar_type() == at::kDouble || out_dtype == at::kDouble) {
      launch<Launcher>(softmax_fwd_kernel<double>, a);
    } else {
      launch<Launcher>(softmax_fwd_kernel<float>, a);
    }
  }
  return input.dim() == 0 ? out.reshape({}) : out;
}

// Launch logic of native_softmax_bwd.
template <typename Launcher>
at::Tensor softmax_bwd_impl(const at::Tensor& grad_output, const at::Tensor& output, int64_t dim,
                            double scale, const std::optional<at::Tensor>& mask, bool causal,
                            bool log, at::ScalarType input_dtype) {
  check_softmax_bwd_args(grad_output, output, input_dtype);
  at::Tensor mask_view;
  dim = check_softmax_args(output, "output", dim, mask, causal, scale, mask_view);
  const bool scalar = output.dim() == 0;
  const at::Tensor y = scalar ? output.reshape({1}) : output;
  const at::Tensor g = scalar ? grad_output.reshape({1}) : grad_output;
  if (scalar && mask_view.defined()) mask_view = mask_view.reshape({1});
  at::Tensor grad_input = softmax_row_output(y, dim, input_dtype);
  if (y.numel() > 0) {
    cpu::RowLayout layout(y.sizes(), dim);
    layout.add(0, g);
    layout.add(1, y);
    layout.add(2, grad_input);
    layout.add(3, mask_view);
    SoftmaxArgs a{};
    a.rows = pack_rows(layout);
    a.in0 = g.data_ptr();
    a.in0_dtype = dtype_code(g.scalar_type());
    a.in1 = y.data_ptr();
    a.in1_dtype = dtype_code(y.scalar_type());
    a.out = grad_input.data_ptr();
    a.out_dtype = dtype_code(input_dtype);
    a.mask = mask_view.defined() ? mask_view.data_ptr() : nullptr;
    a.mask_dtype = mask_view.defined() ? dtype_code(mask_view.scalar_type()) : kF32;
    a.mask_kind = mask_kind_of(mask_view);
    a.mask_slot = 3;
    a.scale = scale;
    a.causal = causal;
    a.log = log;
    if (y.scalar_type() == at::kDouble || input_dtype == at::kDouble ||
        g.scalar_type() == at::kDouble) {
      launch<Launcher>(softmax_bwd_kernel<double>, a);
    } else {
      launch<Launcher>(softmax_bwd_kernel<float>, a);
    }
  }
  return scalar ? grad_input.reshape({}) : grad_input;
}

}  // namespace fastattn::cuda::softmax
