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
// Algorithm: a warp or a block per row (a grid-stride loop over rows), each thread a strided
// slice of the columns. Forward: one sweep keeps each thread's running (max, sum of exp) -- the
// online softmax, so one read of the row gives both statistics -- merged with warp shuffles
// (and across warps through shared memory); a second sweep recomputes z (from L2 for rows that
// fit) and writes y. Backward: one sweep for the row sum, one to write dx. Two layouts, one
// kernel body (cuda_rows.cuh's row access):
//   - Vector<T>: the common case -- no mask, every tensor contiguous with the reduced dim last,
//     one dtype, 16-byte aligned data -- reads and writes 16-byte vectors (4 float32, 8 bf16 or
//     fp16), element by element only for the few columns before a row's first aligned vector
//     and after its last whole one; a warp per row (four rows a block) when each lane has at
//     most four vectors, else a block per row. Resident<T>: the same with the row kept in
//     registers between the sweeps, so it is read from memory once -- every such row up to
//     16k float32 / 32k bf16 elements (forward; half that backward); longer rows are read
//     twice, the second time mostly from L2.
//   - Strided: anything else. Loads and stores convert any of the four float dtypes (and bool
//     masks) to the accumulation type one element at a time, every tensor through its own
//     strides (broadcast masks with stride 0), so nothing is expanded in memory.
// Accumulation: float for 16-bit and float32 rows, double when a float64 tensor is involved.
// Offsets are 64-bit.
//
// Bytes per row of C elements: forward reads C (once when resident, else twice, the second
// time mostly from L2) and writes C; backward reads y and g (once or twice) and writes dx; plus
// the mask where it is not broadcast.
//
// Not yet (not yet run on a GPU in this project): skipping the masked causal tail, rows longer
// than the registers held in shared memory. Performance is to be measured with the harness on
// a GPU.

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
  int64_t inner_len;   // size of the innermost leading dim: row % inner_len is the causal row
  int threads_per_row;  // 32 (a warp per row) or the block size
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

// z_j: the scaled (and mask-added) input x_j, -inf where masked.
template <typename A>
__device__ inline A z_at(const SoftmaxArgs& a, const RowOffsets& r, int64_t j, int64_t limit,
                         A x, bool& keep) {
  A add;
  keep = keep_at<A>(a, r, j, limit, add);
  return keep ? x * static_cast<A>(a.scale) + add : A(-INFINITY);
}

// The two layouts a kernel runs on: Strided (any dtypes and strides, masks) and Vec<T> (one
// dtype, contiguous rows with the reduced dim last, no mask: 16-byte loads and stores).
struct Strided {
  using Row = StridedRow;
  // fwd: input -> output; bwd: (grad_output, output) -> dx. `r` gets the mask's offsets too.
  __device__ static Row fwd(const SoftmaxArgs& a, int64_t row, RowOffsets& r) {
    r = row_offsets(a.rows, row);
    return {{a.in0, a.in0}, {a.in0_dtype, a.in0_dtype}, {r.off[0], r.off[0]},
            {a.rows.col_stride[0], a.rows.col_stride[0]}, a.out, a.out_dtype, r.off[1], 1};
  }
  __device__ static Row bwd(const SoftmaxArgs& a, int64_t row, RowOffsets& r) {
    r = row_offsets(a.rows, row);
    return {{a.in0, a.in1}, {a.in0_dtype, a.in1_dtype}, {r.off[0], r.off[1]},
            {a.rows.col_stride[0], a.rows.col_stride[1]}, a.out, a.out_dtype, r.off[2], 1};
  }
};

template <typename T>
struct Vector {
  using Row = VecRow<T>;
  __device__ static Row fwd(const SoftmaxArgs& a, int64_t row, RowOffsets&) {
    const T* x = static_cast<const T*>(a.in0);
    return {{x, x}, static_cast<T*>(a.out), row * a.rows.cols};
  }
  __device__ static Row bwd(const SoftmaxArgs& a, int64_t row, RowOffsets&) {
    return {{static_cast<const T*>(a.in0), static_cast<const T*>(a.in1)}, static_cast<T*>(a.out),
            row * a.rows.cols};
  }
};

// Vector<T> with the row held in registers between the sweeps (one read of it from memory).
template <typename T, int kVecs>
struct Resident {
  using Row = ResidentRow<T, kVecs>;
  __device__ static Row fwd(const SoftmaxArgs& a, int64_t row, RowOffsets& r) {
    return {Vector<T>::fwd(a, row, r)};
  }
  __device__ static Row bwd(const SoftmaxArgs& a, int64_t row, RowOffsets& r) {
    return {Vector<T>::bwd(a, row, r)};
  }
};

// Vectors a thread keeps in registers: eight of the forward's one input, four of each of the
// backward's two (32 registers either way; 512 threads leave 128 a thread). Rows up to 4096
// vectors (forward; 2048 backward) -- 16k float32 or 32k bf16 elements -- are read once;
// longer ones are streamed twice.
constexpr int kFwdVecs = 8;
constexpr int kBwdVecs = 4;

template <typename A, typename Layout>
__global__ void __launch_bounds__(kMaxRowThreads) softmax_fwd_kernel(SoftmaxArgs a) {
  FASTATTN_BLOCK_SHARED A scratch_m[32];
  FASTATTN_BLOCK_SHARED A scratch_s[32];
  FASTATTN_BLOCK_SHARED A scratch_any[32];
  const int64_t C = a.rows.cols;
  const RowGroup grp = row_group(a.threads_per_row);
  for (int64_t row = grp.first; row < a.rows.rows; row += grp.step) {
    RowOffsets r{};
    typename Layout::Row x = Layout::fwd(a, row, r);
    const int64_t limit = a.causal ? std::min<int64_t>(row % a.inner_len + 1, C) : C;
    MaxSum<A> ms = MaxSum<A>::empty();
    A any = A(0);
    x.template each<1, A>(C, grp.t, grp.nt, [&](int64_t j, A xj, A) {
      bool keep;
      ms.add(z_at<A>(a, r, j, limit, xj, keep));
      any += keep ? A(1) : A(0);
    });
    ms = row_max_sum(ms, grp.nt, scratch_m, scratch_s);
    // Without a mask some element is kept (limit >= 1): no reduction needed to know it.
    if (a.mask_kind != kNoMask && row_sum(any, grp.nt, scratch_any) == A(0)) {
      const A fill = a.log ? A(-INFINITY) : A(0);
      x.template map<0, A>(C, grp.t, grp.nt, [&](int64_t, A, A) { return fill; });
      continue;
    }
    // m = -inf, s = 0 when every kept value is -inf: exp(-inf - -inf) = NaN, as torch.softmax.
    const A log_s = log_acc(ms.s);
    const A inv_s = A(1) / ms.s;
    x.template map<1, A>(C, grp.t, grp.nt, [&](int64_t j, A xj, A) {
      bool keep;
      const A z = z_at<A>(a, r, j, limit, xj, keep);
      return a.log ? (z - ms.m) - log_s : exp_acc(z - ms.m) * inv_s;
    });
  }
}

template <typename A, typename Layout>
__global__ void __launch_bounds__(kMaxRowThreads) softmax_bwd_kernel(SoftmaxArgs a) {
  FASTATTN_BLOCK_SHARED A scratch[32];
  const int64_t C = a.rows.cols;
  const RowGroup grp = row_group(a.threads_per_row);
  for (int64_t row = grp.first; row < a.rows.rows; row += grp.step) {
    RowOffsets r{};
    typename Layout::Row gy = Layout::bwd(a, row, r);
    const int64_t limit = a.causal ? std::min<int64_t>(row % a.inner_len + 1, C) : C;
    // The row sum runs over every column, masked ones included, exactly as the composition
    // masked_fill -> (log_)softmax differentiates; masked columns are zeroed afterwards.
    A t = A(0);
    gy.template each<2, A>(C, grp.t, grp.nt, [&](int64_t, A g, A y) { t += a.log ? g : g * y; });
    t = row_sum(t, grp.nt, scratch);
    gy.template map<2, A>(C, grp.t, grp.nt, [&](int64_t j, A g, A y) {
      A add;
      const bool keep = keep_at<A>(a, r, j, limit, add);
      const A dz = a.log ? g - exp_acc(y) * t : y * (g - t);
      return keep ? dz * static_cast<A>(a.scale) : A(0);
    });
  }
}

inline int mask_kind_of(const at::Tensor& mask_view) {
  if (!mask_view.defined()) return kNoMask;
  return mask_view.scalar_type() == at::kBool ? kBoolMask : kAdditiveMask;
}

// Picks the layout -- Resident<T> when `vec` and the row fits in registers, Vector<T> when `vec`,
// else Strided -- and the accumulation type (double when `wide`), fills in the grid, launches.
template <typename Launcher, bool kFwd>
void launch(SoftmaxArgs& a, bool vec, at::ScalarType dtype, bool wide) {
  const int64_t elem = c10::elementSize(dtype);
  const RowGrid resident = vec ? resident_grid(a.rows.cols, elem, kFwd ? kFwdVecs : kBwdVecs)
                               : RowGrid{0, 0};
  const RowGrid grid = resident.threads ? resident : row_grid(a.rows.cols, elem, vec);
  a.threads_per_row = grid.per_row;
  const unsigned blocks = row_blocks<Launcher>(a.rows.rows, grid);
  auto go = [&](auto acc_tag, auto layout_tag) {
    using A = decltype(acc_tag);
    using L = decltype(layout_tag);
    if constexpr (kFwd) {
      Launcher::launch(softmax_fwd_kernel<A, L>, blocks, grid.threads, a);
    } else {
      Launcher::launch(softmax_bwd_kernel<A, L>, blocks, grid.threads, a);
    }
  };
  auto go_vec = [&](auto acc_tag, auto elem_tag) {
    using T = decltype(elem_tag);
    // float64 rows stream: their vectors hold two elements and their arithmetic twice the
    // registers, and float64 is for checking, not speed.
    if constexpr (std::is_same_v<T, double>) {
      go(acc_tag, Vector<T>());
    } else if (resident.threads) {
      go(acc_tag, Resident<T, kFwd ? kFwdVecs : kBwdVecs>());
    } else {
      go(acc_tag, Vector<T>());
    }
  };
  if (!vec) {
    wide ? go(double(), Strided()) : go(float(), Strided());
    return;
  }
  switch (dtype) {
    case at::kFloat: go_vec(float(), float()); break;
    case at::kDouble: go_vec(double(), double()); break;
    case at::kHalf: go_vec(float(), c10::Half()); break;
    default: go_vec(float(), c10::BFloat16()); break;
  }
}

// The arguments the forward and backward share: the mask (row tensor `slot`), the options.
inline void set_options(SoftmaxArgs& a, const at::Tensor& mask_view, int slot, double scale,
                        bool causal, bool log, int64_t inner) {
  a.mask = mask_view.defined() ? mask_view.data_ptr() : nullptr;
  a.mask_dtype = mask_view.defined() ? dtype_code(mask_view.scalar_type()) : kF32;
  a.mask_kind = mask_kind_of(mask_view);
  a.mask_slot = slot;
  a.scale = scale;
  a.causal = causal;
  a.log = log;
  a.inner_len = inner;
}

// The innermost leading dim's size (the causal mask's row count), 1 without leading dims.
inline int64_t inner_len(const at::Tensor& t, int64_t dim) {
  for (int64_t d = t.dim() - 1; d >= 0; --d) {
    if (d != dim) return t.size(d);
  }
  return 1;
}

// Launch logic of native_softmax_fwd: checks, the output, the row layout, the kernel.
template <typename Launcher>
at::Tensor softmax_fwd_impl(const at::Tensor& input, int64_t dim, double scale,
                            const std::optional<at::Tensor>& mask, bool causal, bool log,
                            at::ScalarType out_dtype) {
  check_kernel_float(input.scalar_type(), "input");
  const auto [d, x, mask_view, out] =
      prepare_softmax_fwd(input, dim, mask, causal, scale, out_dtype);
  dim = d;
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
    set_options(a, mask_view, 2, scale, causal, log, inner_len(x, dim));
    const bool vec = !mask_view.defined() && vec_rows_ok({&x, &out}, dim);
    launch<Launcher, true>(a, vec, x.scalar_type(),
                           x.scalar_type() == at::kDouble || out_dtype == at::kDouble);
  }
  return softmax_result(out, input);
}

// Launch logic of native_softmax_bwd.
template <typename Launcher>
at::Tensor softmax_bwd_impl(const at::Tensor& grad_output, const at::Tensor& output, int64_t dim,
                            double scale, const std::optional<at::Tensor>& mask, bool causal,
                            bool log, at::ScalarType input_dtype) {
  const auto [d, g, y, mask_view, grad_input] =
      prepare_softmax_bwd(grad_output, output, dim, mask, causal, scale, input_dtype);
  dim = d;
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
    set_options(a, mask_view, 3, scale, causal, log, inner_len(y, dim));
    const bool vec = !mask_view.defined() && vec_rows_ok({&g, &y, &grad_input}, dim);
    launch<Launcher, false>(a, vec, y.scalar_type(),
                            y.scalar_type() == at::kDouble || input_dtype == at::kDouble ||
                                g.scalar_type() == at::kDouble);
  }
  return softmax_result(grad_input, output);
}

}  // namespace fastattn::cuda::softmax
