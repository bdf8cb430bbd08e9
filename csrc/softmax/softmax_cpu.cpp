// CPU launcher of fastattn::native_softmax_fwd / native_softmax_bwd: checks, output layout,
// at::parallel_for over rows, and the kernel copy for this CPU (softmax_cpu_kernel.h).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "softmax.h"
#include "softmax_args.h"

namespace fastattn {
namespace {

using cpu::MaskKind;
using cpu::RowLayout;
using cpu::SoftmaxParams;

MaskKind mask_kind_of(const at::Tensor& mask_view) {
  if (!mask_view.defined()) return MaskKind::kNone;
  return mask_view.scalar_type() == at::kBool ? MaskKind::kBool : MaskKind::kAdditive;
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
  const auto [d, x, mask_view, out] =
      prepare_softmax_fwd(input, dim, mask, causal, scale, out_dtype);
  dim = d;
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
    p.mask_kind = mask_kind_of(mask_view);
    p.scale = scale;
    p.causal = causal;
    p.log = log;
    p.acc_double = x.scalar_type() == at::kDouble || out_dtype == at::kDouble;
    run(FASTATTN_CPU_KERNEL(softmax_fwd_rows), p);
  }
  return softmax_result(out, input);
}

at::Tensor softmax_bwd_cpu(const at::Tensor& grad_output, const at::Tensor& output, int64_t dim,
                           double scale, const std::optional<at::Tensor>& mask, bool causal,
                           bool log, at::ScalarType input_dtype) {
  check_cpu_float(output, "output");
  const auto [d, g, y, mask_view, grad_input] =
      prepare_softmax_bwd(grad_output, output, dim, mask, causal, scale, input_dtype);
  dim = d;
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
    p.mask_kind = mask_kind_of(mask_view);
    p.scale = scale;
    p.causal = causal;
    p.log = log;
    p.acc_double = y.scalar_type() == at::kDouble || input_dtype == at::kDouble;
    run(FASTATTN_CPU_KERNEL(softmax_bwd_rows), p);
  }
  return softmax_result(grad_input, output);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("native_softmax_fwd", &softmax_fwd_cpu);
  m.impl("native_softmax_bwd", &softmax_bwd_cpu);
}

}  // namespace fastattn
