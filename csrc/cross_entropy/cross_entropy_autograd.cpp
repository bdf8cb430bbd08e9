// fastattn::native_cross_entropy: native_cross_entropy_fwd under a C++ autograd Function (see
// csrc/common/autograd.h). Forward writes the gradient of the loss for a unit upstream gradient
// into a logits-sized buffer while it computes the loss; backward returns that buffer, scaled
// by the upstream gradient unless it is exactly 1 (`loss.backward()`), in place unless the
// graph is retained: the semantics of fastattn/ops/cross_entropy.py, which takes this path for
// eager calls whose target does not require grad.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../common/autograd.h"

namespace fastattn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr const char* kNoDoubleBackward =
    "fastattn.cross_entropy has no second derivative: its backward scales the gradient "
    "computed in forward, so backward with create_graph=True (double backward, Hessians) is "
    "not supported; use torch.nn.functional.cross_entropy there";

std::tuple<at::Tensor, at::Tensor> forward_kernel(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, int64_t reduction, double label_smoothing, double z_loss,
    double softcap, const std::optional<at::Tensor>& grad) {
  static const auto op =
      native_op<std::tuple<at::Tensor, at::Tensor>(
          const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
          int64_t, double, double, double, const std::optional<at::Tensor>&)>(
          "fastattn::native_cross_entropy_fwd");
  return op.call(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                 softcap, grad);
}

// True when the upstream gradient is the scalar 1 (`loss.backward()`): then the saved gradient
// is the answer. Never asked of traced tensors (fake, functional, under a dispatch mode), where
// the data-dependent check would fail the trace: the scale is applied there, as in Python.
bool upstream_is_one(const at::Tensor& upstream) {
  const auto traced = c10::DispatchKeySet({c10::DispatchKey::Python,
                                           c10::DispatchKey::Functionalize});
  if (c10::impl::TorchDispatchModeTLS::any_modes_set() || upstream.key_set().has_any(traced) ||
      upstream.numel() != 1) {
    return false;
  }
  return upstream.item<double>() == 1.0;
}

struct CrossEntropyFunction : torch::autograd::Function<CrossEntropyFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const at::Tensor& target, const std::optional<at::Tensor>& weight,
                               int64_t ignore_index, int64_t reduction, double label_smoothing,
                               double z_loss, double softcap) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor grad = at::empty(input.sizes(), input.options());
    auto [loss, lse] = forward_kernel(input, target, weight, ignore_index, reduction,
                                      label_smoothing, z_loss, softcap, grad);
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);  // no zero-filled gradient for lse
    ctx->save_for_backward({grad});
    ctx->saved_data["reduction"] = reduction;
    return {loss, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(), kNoDoubleBackward);
    variable_list result(8);
    const at::Tensor& upstream = grads[0];
    if (!upstream.defined()) return result;
    at::Tensor grad = ctx->get_saved_variables()[0];
    if (upstream_is_one(upstream)) {
      result[0] = grad;
      return result;
    }
    const at::Tensor scale =
        ctx->saved_data.at("reduction").toInt() == 0 ? upstream.unsqueeze(1) : upstream;
    // In place unless a later backward over the retained graph must find the buffer unscaled.
    result[0] = torch::autograd::get_current_graph_task_keep_graph() ? grad.mul(scale)
                                                                      : grad.mul_(scale);
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> cross_entropy_autograd(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, int64_t reduction, double label_smoothing, double z_loss,
    double softcap) {
  TORCH_CHECK(!target.requires_grad(),
              "fastattn::native_cross_entropy: target must not require grad (it would get no "
              "gradient); fastattn.cross_entropy differentiates probability targets");
  if (!(at::GradMode::is_enabled() && input.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return forward_kernel(input, target, weight, ignore_index, reduction, label_smoothing,
                          z_loss, softcap, std::nullopt);
  }
  variable_list out = CrossEntropyFunction::apply(input, target, weight, ignore_index, reduction,
                                                  label_smoothing, z_loss, softcap);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_below_autograd(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, int64_t reduction, double label_smoothing, double z_loss,
    double softcap) {
  return forward_kernel(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                        softcap, std::nullopt);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, Autograd, m) {
  m.impl("native_cross_entropy", &cross_entropy_autograd);
}

TORCH_LIBRARY_IMPL(fastattn, CompositeExplicitAutograd, m) {
  m.impl("native_cross_entropy", &cross_entropy_below_autograd);
}

}  // namespace fastattn
