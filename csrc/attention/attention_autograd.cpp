// fastattn::native_attention: native_attention_fwd and native_attention_bwd joined by a C++
// autograd Function (see csrc/common/autograd.h). Differentiable in q, k and v; fastattn.ops.
// attention takes this path for eager calls whose mask does not require grad (an additive mask
// that does gets its gradient from the Python autograd).

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../common/autograd.h"

namespace fastattn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor> forward_kernel(const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& v, const OptTensor& mask,
                                                  const OptTensor& seed, double dropout_p,
                                                  double scale, int64_t window_left,
                                                  int64_t window_right, bool align_bottom,
                                                  double softcap) {
  static const auto op =
      native_op<std::tuple<at::Tensor, at::Tensor>(
          const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
          const OptTensor&, double, double, int64_t, int64_t, bool, double)>(
          "fastattn::native_attention_fwd");
  return op.call(q, k, v, mask, seed, dropout_p, scale, window_left, window_right, align_bottom,
                 softcap);
}

OptTensor optional(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

struct AttentionFunction : torch::autograd::Function<AttentionFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const OptTensor& mask, const OptTensor& seed,
                               double dropout_p, double scale, int64_t window_left,
                               int64_t window_right, bool align_bottom, double softcap) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, lse] = forward_kernel(q, k, v, mask, seed, dropout_p, scale, window_left,
                                     window_right, align_bottom, softcap);
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);  // no zero-filled gradient for lse
    ctx->save_for_backward(
        {q, k, v, out, lse, mask.value_or(at::Tensor()), seed.value_or(at::Tensor())});
    auto& d = ctx->saved_data;
    d["dropout_p"] = dropout_p;
    d["scale"] = scale;
    d["window_left"] = window_left;
    d["window_right"] = window_right;
    d["align_bottom"] = align_bottom;
    d["softcap"] = softcap;
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        native_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
            const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, double,
            double, int64_t, int64_t, bool, double, bool)>("fastattn::native_attention_bwd");
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor& out = s[3];
    const at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(out);
    const auto& d = ctx->saved_data;
    const auto g = backward_op([&] {
      return op.call(grad_out, s[0], s[1], s[2], out, s[4], optional(s[5]), optional(s[6]),
                     d.at("dropout_p").toDouble(), d.at("scale").toDouble(),
                     d.at("window_left").toInt(), d.at("window_right").toInt(),
                     d.at("align_bottom").toBool(), d.at("softcap").toDouble(),
                     /*mask_grad=*/false);
    });
    variable_list result(11);
    result[0] = std::get<0>(g);
    result[1] = std::get<1>(g);
    result[2] = std::get<2>(g);
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor> attention_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& mask,
    const OptTensor& seed, double dropout_p, double scale, int64_t window_left,
    int64_t window_right, bool align_bottom, double softcap) {
  TORCH_CHECK(!mask.has_value() || !mask->requires_grad(),
              "fastattn::native_attention: attn_mask must not require grad (it would get no "
              "gradient); fastattn's attention functions differentiate additive masks");
  variable_list out = AttentionFunction::apply(q, k, v, mask, seed, dropout_p, scale,
                                               window_left, window_right, align_bottom, softcap);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, Autograd, m) {
  m.impl("native_attention", &attention_autograd);
  m.impl("native_attention_bwd", no_double_backward());
}

TORCH_LIBRARY_IMPL(fastattn, CompositeExplicitAutograd, m) {
  m.impl("native_attention", &forward_kernel);
}

}  // namespace fastattn
