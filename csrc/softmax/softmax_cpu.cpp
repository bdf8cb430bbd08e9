// CPU launcher of fastattn::native_softmax_fwd / native_softmax_bwd: checks, output layout,
// at::parallel_for over rows, and the kernel copy for this CPU (softmax_cpu_kernel.h).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "../common/checks.h"
#include "softmax.h"

namespace fastattn {
namespace {

using cpu::MaskKind;
using cpu::RowLayout;
using cpu::SoftmaxParams;

// fastattn.reference.row_output: contiguous with `dim` moved last, viewed back in dim order.
at::Tensor row_output(at::IntArrayRef shape, int64_t dim, at::ScalarType dtype) {
  std::vector<int64_t> moved(shape.begin(), shape.end());
  moved.erase(moved.begin() + dim);
  moved.push_back(shape[dim]);
  return at::empty(moved, at::TensorOptions().dtype(dtype)).movedim(-1, dim);
}

// Checks the shared arguments; returns the wrapped dim and the mask broadcast (as a view).
int64_t check_common(const at::Tensor& ref, const char* ref_name, int64_t dim,
                     const std::optional<at::Tensor>& mask, bool causal, double scale,
                     at::Tensor& mask_view, MaskKind& kind) {
  const int64_t nd = std::max<int64_t>(ref.dim(), 1);
  TORCH_CHECK(dim >= -nd && dim < nd, "dim=", dim, " is out of range for ", ref_name, " with ",
              ref.dim(), " dims");
  dim = dim < 0 ? dim + nd : dim;
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  TORCH_CHECK(!causal || (ref.dim() >= 2 && dim == ref.dim() - 1), "causal=True needs ",
              ref_name, " with at least 2 dims reduced along its last dim, got shape ",
              ref.sizes(), " and dim=", dim);
  kind = MaskKind::kNone;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.device().is_cpu(), "mask must be a CPU tensor, got a tensor on ", m.device());
    TORCH_CHECK(m.scalar_type() == at::kBool || is_kernel_float(m.scalar_type()),
                "mask must be bool or float32/float64/float16/bfloat16, got ", m.scalar_type());
    check_broadcasts(m, ref.sizes(), "mask");
    kind = m.scalar_type() == at::kBool ? MaskKind::kBool : MaskKind::kAdditive;
    mask_view = m.expand(ref.sizes());
  }
  return dim;
}

void run(void (*kernel)(const SoftmaxParams&, int64_t, int64_t), const SoftmaxParams& p) {
  const int64_t cols = std::max<int64_t>(p.layout->cols, 1);
  // About 32k elements per task, as PyTorch's own CPU kernels (at::internal::GRAIN_SIZE).
  const int64_t grain = std::max<int64_t>(1, 32768 / cols);
  at::parallel_for(0, p.layout->rows, grain,
                   [&](int64_t begin, int64_t end) { kernel(p, begin, end); });
}

at::Tensor softmax_fwd_cpu(const at::Tensor& input, int64_t dim, double scale,
                           const std::optional<at::Tensor>& mask, bool causal, bool log,
                           at::ScalarType out_dtype) {
  check_cpu_float(input, "input");
  TORCH_CHECK(is_kernel_float(out_dtype),
              "out_dtype must be float32, float64, float16 or bfloat16, got ", out_dtype);
  at::Tensor mask_view;
  MaskKind kind;
  dim = check_common(input, "input", dim, mask, causal, scale, mask_view, kind);
  const at::Tensor x = input.dim() == 0 ? input.reshape({1}) : input;
  if (input.dim() == 0 && mask_view.defined()) mask_view = mask_view.reshape({1});
  at::Tensor out = row_output(x.sizes(), dim, out_dtype);
  if (x.numel() > 0) {
    RowLayout layout(x.sizes(), dim);
    layout.add(0, x);
    layout.add(1, out);
    layout.add(2, mask_view);
    SoftmaxParams p{};
    p.layout = &layout;
    p.in[0] = x.data_ptr();
    p.in_dtype[0] = x.scalar_type();
    p.out = out.data_ptr();
    p.out_dtype = out_dtype;
    p.mask = mask_view.defined() ? mask_view.data_ptr() : nullptr;
    p.mask_dtype = mask_view.defined() ? mask_view.scalar_type() : at::kFloat;
    p.mask_kind = kind;
    p.scale = scale;
    p.causal = causal;
    p.log = log;
    p.acc_double = x.scalar_type() == at::kDouble || out_dtype == at::kDouble;
    run(FASTATTN_CPU_KERNEL(softmax_fwd_rows), p);
  }
  return input.dim() == 0 ? out.reshape({}) : out;
}

at::Tensor softmax_bwd_cpu(const at::Tensor& grad_output, const at::Tensor& output, int64_t dim,
                           double scale, const std::optional<at::Tensor>& mask, bool causal,
                           bool log, at::ScalarType input_dtype) {
  check_cpu_float(grad_output, "grad_output");
  check_cpu_float(output, "output");
  TORCH_CHECK(grad_output.sizes() == output.sizes(), "grad_output of shape ",
              grad_output.sizes(), " must have the shape of output, ", output.sizes());
  TORCH_CHECK(is_kernel_float(input_dtype),
              "input_dtype must be float32, float64, float16 or bfloat16, got ", input_dtype);
  at::Tensor mask_view;
  MaskKind kind;
  dim = check_common(output, "output", dim, mask, causal, scale, mask_view, kind);
  const bool scalar = output.dim() == 0;
  const at::Tensor y = scalar ? output.reshape({1}) : output;
  const at::Tensor g = scalar ? grad_output.reshape({1}) : grad_output;
  if (scalar && mask_view.defined()) mask_view = mask_view.reshape({1});
  at::Tensor grad_input = row_output(y.sizes(), dim, input_dtype);
  if (y.numel() > 0) {
    RowLayout layout(y.sizes(), dim);
    layout.add(0, g);
    layout.add(1, y);
    layout.add(2, grad_input);
    layout.add(3, mask_view);
    SoftmaxParams p{};
    p.layout = &layout;
    p.in[0] = g.data_ptr();
    p.in_dtype[0] = g.scalar_type();
    p.in[1] = y.data_ptr();
    p.in_dtype[1] = y.scalar_type();
    p.out = grad_input.data_ptr();
    p.out_dtype = input_dtype;
    p.mask = mask_view.defined() ? mask_view.data_ptr() : nullptr;
    p.mask_dtype = mask_view.defined() ? mask_view.scalar_type() : at::kFloat;
    p.mask_kind = kind;
    p.scale = scale;
    p.causal = causal;
    p.log = log;
    p.acc_double = y.scalar_type() == at::kDouble || input_dtype == at::kDouble;
    run(FASTATTN_CPU_KERNEL(softmax_bwd_rows), p);
  }
  return scalar ? grad_input.reshape({}) : grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("native_softmax_fwd", &softmax_fwd_cpu);
  m.impl("native_softmax_bwd", &softmax_bwd_cpu);
}

}  // namespace fastattn
