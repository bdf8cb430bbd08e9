// fastattn::native_softmax: native_softmax_fwd and native_softmax_bwd joined by a C++ autograd
// Function (see csrc/common/autograd.h). Differentiable in `input`; fastattn.ops.softmax takes
// this path for eager calls whose mask does not require grad (an additive mask that does gets
// its gradient from the Python autograd).

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>

#include "../common/autograd.h"

namespace fastattn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor forward_kernel(const at::Tensor& input, int64_t dim, double scale,
                          const std::optional<at::Tensor>& mask, bool causal, bool log,
                          at::ScalarType out_dtype) {
  static const auto op =
      native_op<at::Tensor(const at::Tensor&, int64_t, double, const std::optional<at::Tensor>&,
                           bool, bool, at::ScalarType)>("fastattn::native_softmax_fwd");
  return op.call(input, dim, scale, mask, causal, log, out_dtype);
}

struct SoftmaxFunction : torch::autograd::Function<SoftmaxFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, int64_t dim,
                            double scale, const std::optional<at::Tensor>& mask, bool causal,
                            bool log, at::ScalarType out_dtype) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor output = forward_kernel(input, dim, scale, mask, causal, log, out_dtype);
    ctx->save_for_backward({output, mask.value_or(at::Tensor())});
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["log"] = log;
    ctx->saved_data["input_dtype"] = input.scalar_type();
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        native_op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, double,
                             const std::optional<at::Tensor>&, bool, bool, at::ScalarType)>(
            "fastattn::native_softmax_bwd");
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& output = saved[0];
    std::optional<at::Tensor> mask;
    if (saved[1].defined()) mask = saved[1];
    const auto& d = ctx->saved_data;
    at::Tensor grad_input = backward_op([&] {
      return op.call(grads[0], output, d.at("dim").toInt(), d.at("scale").toDouble(), mask,
                     d.at("causal").toBool(), d.at("log").toBool(),
                     d.at("input_dtype").toScalarType());
    });
    return {grad_input, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor softmax_autograd(const at::Tensor& input, int64_t dim, double scale,
                            const std::optional<at::Tensor>& mask, bool causal, bool log,
                            at::ScalarType out_dtype) {
  TORCH_CHECK(!mask.has_value() || !mask->requires_grad(),
              "fastattn::native_softmax: mask must not require grad (it would get no "
              "gradient); fastattn.softmax differentiates additive masks");
  return SoftmaxFunction::apply(input, dim, scale, mask, causal, log, out_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, Autograd, m) {
  m.impl("native_softmax", &softmax_autograd);
  m.impl("native_softmax_bwd", no_double_backward());
}

// Below autograd (inference mode, or a caller that already handled autograd): the forward.
TORCH_LIBRARY_IMPL(fastattn, CompositeExplicitAutograd, m) {
  m.impl("native_softmax", &forward_kernel);
}

}  // namespace fastattn
