// CPU launcher of fastattn::native_cross_entropy_fwd: checks, the mean's denominator (one pass
// over the targets, which also rejects class indices out of range), at::parallel_for over
// tokens with the kernel copy for this CPU (cross_entropy_cpu_kernel.h), and the reduction.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/where.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cross_entropy_args.h"
#include "cross_entropy.h"

namespace fastattn {
namespace {

// Calls f(A*) with A the C++ type of the accumulation dtype (float or double).
template <typename F>
void with_acc(at::ScalarType acc, F&& f) {
  if (acc == at::kDouble) {
    f(static_cast<double*>(nullptr));
  } else {
    f(static_cast<float*>(nullptr));
  }
}

using cpu::CrossEntropyParams;
using cpu::RowLayout;

// Checks every class index that is not ignore_index against [0, C) (TORCH_CHECK_INDEX: an
// IndexError in Python, so fastattn.ops skips its own check for this kernel); returns how many
// are not ignore_index.
int64_t check_class_indices(const at::Tensor& target, int64_t C, int64_t ignore_index) {
  const at::Tensor t = target.contiguous();
  const int64_t* y = t.data_ptr<int64_t>();
  int64_t valid = 0;
  for (int64_t i = 0; i < t.numel(); ++i) {
    TORCH_CHECK_INDEX(y[i] == ignore_index || (y[i] >= 0 && y[i] < C), "target holds class index ",
                y[i], ", outside [0, ", C, ") and not ignore_index=", ignore_index);
    valid += y[i] != ignore_index;
  }
  return valid;
}

// What the mean divides by, computed as fastattn.reference.cross_entropy_denominator does (the
// specification): a sum in the accumulation dtype of the target classes' weights over
// non-ignored tokens (their count without weight), the token count for probability targets.
double denominator(const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t C,
                   int64_t ignore_index, bool probability, int64_t tokens, int64_t valid,
                   at::ScalarType acc) {
  if (probability) return static_cast<double>(tokens);
  if (!weight.has_value()) return static_cast<double>(valid);
  const at::Tensor picked = weight->to(acc).index_select(0, target.clamp(0, C - 1).flatten());
  return at::where(target.ne(ignore_index).flatten(), picked, 0.0).sum().item<double>();
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, int64_t reduction, double label_smoothing, double z_loss,
    double softcap, const std::optional<at::Tensor>& grad) {
  check_cpu_float(input, "input");
  const CrossEntropyInputs in = prepare_cross_entropy(input, target, weight, reduction,
                                                       label_smoothing, z_loss, softcap, grad);
  const int64_t C = in.classes, tokens = in.tokens;
  const bool probability = in.probability;
  const at::ScalarType acc = in.acc;
  const at::Tensor &w = in.w, &t = in.t;
  const int64_t valid = probability ? tokens : check_class_indices(t, C, ignore_index);
  const double denom =
      reduction == 1 ? denominator(t, weight, C, ignore_index, probability, tokens, valid, acc) : 1.0;

  const auto opts = at::TensorOptions().dtype(acc);
  at::Tensor loss = at::empty({tokens}, opts);
  at::Tensor lse = at::empty({tokens}, opts.dtype(at::kFloat));
  if (tokens > 0) {
    RowLayout layout(input.sizes(), 1);
    layout.add(0, input);
    layout.add(1, probability ? t : t.unsqueeze(1));
    layout.add(2, grad.has_value() ? *grad : at::Tensor());
    CrossEntropyParams p{};
    p.layout = &layout;
    p.input = input.data_ptr();
    p.input_dtype = input.scalar_type();
    p.target = t.data_ptr();
    p.target_dtype = t.scalar_type();
    p.probability = probability;
    p.weight = w.defined() ? w.data_ptr() : nullptr;
    p.grad = grad.has_value() ? grad->data_ptr() : nullptr;
    p.loss = loss.data_ptr();
    p.lse = lse.data_ptr<float>();
    p.ignore_index = ignore_index;
    p.one_minus_eps = 1.0 - label_smoothing;
    p.eps_per_class = label_smoothing / static_cast<double>(C);
    p.z_loss = z_loss;
    p.softcap = softcap;
    p.grad_scale = reduction == 1 ? 1.0 / denom : 1.0;
    p.acc_double = acc == at::kDouble;
    auto kernel = FASTATTN_CPU_KERNEL(cross_entropy_fwd_rows);
    // About 32k logits per task, as PyTorch's own CPU kernels (at::internal::GRAIN_SIZE).
    const int64_t grain = std::max<int64_t>(1, 32768 / C);
    at::parallel_for(0, tokens, grain, [&](int64_t b, int64_t e) { kernel(p, b, e); });
  }
  at::Tensor loss_out;
  if (reduction == 0) {
    loss_out = loss.view(in.token_shape);
  } else {
    // The sum in double, rounded once (ATen's sum and div are two more dispatches, several
    // microseconds of a small call); 0 / 0 = NaN for a mean over nothing, as PyTorch.
    double total = 0;
    with_acc(acc, [&](auto* tag) {
      using A = std::remove_pointer_t<decltype(tag)>;
      const A* l = loss.data_ptr<A>();
      for (int64_t i = 0; i < tokens; ++i) total += static_cast<double>(l[i]);
    });
    loss_out = at::empty({}, opts);
    const double value = reduction == 1 ? total / denom : total;
    with_acc(acc, [&](auto* tag) {
      using A = std::remove_pointer_t<decltype(tag)>;
      *loss_out.data_ptr<A>() = static_cast<A>(value);
    });
  }
  return {loss_out, lse.view(in.token_shape)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("native_cross_entropy_fwd", &cross_entropy_fwd_cpu);
}

}  // namespace fastattn
