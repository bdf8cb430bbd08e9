// Argument checks and the output layout of native_softmax_fwd / native_softmax_bwd, shared by
// the CPU launcher (softmax_cpu.cpp) and the CUDA launcher (softmax_cuda.cu), so both devices
// accept and reject exactly the same calls. Host code only.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "../common/checks.h"

namespace fastattn {

// fastattn.reference.row_output: contiguous with `dim` moved last, viewed back in dim order, on
// `like`'s device.
inline at::Tensor softmax_row_output(const at::Tensor& like, int64_t dim, at::ScalarType dtype) {
  std::vector<int64_t> moved(like.sizes().begin(), like.sizes().end());
  moved.erase(moved.begin() + dim);
  moved.push_back(like.size(dim));
  return at::empty(moved, like.options().dtype(dtype)).movedim(-1, dim);
}

// Checks the arguments both ops share; returns the wrapped dim and sets `mask_view` to the mask
// expanded to `ref`'s shape (a view; undefined without a mask).
inline int64_t check_softmax_args(const at::Tensor& ref, const char* ref_name, int64_t dim,
                                  const std::optional<at::Tensor>& mask, bool causal,
                                  double scale, at::Tensor& mask_view) {
  const int64_t nd = std::max<int64_t>(ref.dim(), 1);
  TORCH_CHECK(dim >= -nd && dim < nd, "dim=", dim, " is out of range for ", ref_name, " with ",
              ref.dim(), " dims");
  dim = dim < 0 ? dim + nd : dim;
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  TORCH_CHECK(!causal || (ref.dim() >= 2 && dim == ref.dim() - 1), "causal=True needs ",
              ref_name, " with at least 2 dims reduced along its last dim, got shape ",
              ref.sizes(), " and dim=", dim);
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    check_device(m, "mask", ref.device());
    TORCH_CHECK(m.scalar_type() == at::kBool || is_kernel_float(m.scalar_type()),
                "mask must be bool or float32/float64/float16/bfloat16, got ", m.scalar_type());
    check_broadcasts(m, ref.sizes(), "mask");
    mask_view = m.expand(ref.sizes());
  }
  return dim;
}

// The backward's two row tensors: float, on one device, of one shape.
inline void check_softmax_bwd_args(const at::Tensor& grad_output, const at::Tensor& output,
                                   at::ScalarType input_dtype) {
  check_float_on(grad_output, "grad_output", output.device());
  check_kernel_float(output.scalar_type(), "output");
  TORCH_CHECK(grad_output.sizes() == output.sizes(), "grad_output of shape ",
              grad_output.sizes(), " must have the shape of output, ", output.sizes());
  check_kernel_float(input_dtype, "input_dtype");
}

// What both launchers of native_softmax_fwd work on: the checked dim, the input and the mask
// (expanded to it) with a 0-d input as one row of one element, and the output buffer.
struct SoftmaxFwdRows {
  int64_t dim;
  at::Tensor x;
  at::Tensor mask_view;
  at::Tensor out;  // softmax_result gives it the input's shape back
};

inline SoftmaxFwdRows prepare_softmax_fwd(const at::Tensor& input, int64_t dim,
                                          const std::optional<at::Tensor>& mask, bool causal,
                                          double scale, at::ScalarType out_dtype) {
  check_kernel_float(out_dtype, "out_dtype");
  SoftmaxFwdRows r;
  r.dim = check_softmax_args(input, "input", dim, mask, causal, scale, r.mask_view);
  const bool scalar = input.dim() == 0;
  r.x = scalar ? input.reshape({1}) : input;
  if (scalar && r.mask_view.defined()) r.mask_view = r.mask_view.reshape({1});
  r.out = softmax_row_output(r.x, r.dim, out_dtype);
  return r;
}

// The same for native_softmax_bwd: grad_output, output and the mask, and the gradient buffer.
struct SoftmaxBwdRows {
  int64_t dim;
  at::Tensor g;
  at::Tensor y;
  at::Tensor mask_view;
  at::Tensor grad_input;  // softmax_result gives it the output's shape back
};

inline SoftmaxBwdRows prepare_softmax_bwd(const at::Tensor& grad_output,
                                          const at::Tensor& output, int64_t dim,
                                          const std::optional<at::Tensor>& mask, bool causal,
                                          double scale, at::ScalarType input_dtype) {
  check_softmax_bwd_args(grad_output, output, input_dtype);
  SoftmaxBwdRows r;
  r.dim = check_softmax_args(output, "output", dim, mask, causal, scale, r.mask_view);
  const bool scalar = output.dim() == 0;
  r.y = scalar ? output.reshape({1}) : output;
  r.g = scalar ? grad_output.reshape({1}) : grad_output;
  if (scalar && r.mask_view.defined()) r.mask_view = r.mask_view.reshape({1});
  r.grad_input = softmax_row_output(r.y, r.dim, input_dtype);
  return r;
}

// A launcher's result in the shape of the op's argument `like` (0-d again for a 0-d one).
inline at::Tensor softmax_result(const at::Tensor& rows, const at::Tensor& like) {
  return like.dim() == 0 ? rows.reshape({}) : rows;
}

}  // namespace fastattn
