// Argument checks and prepared inputs of native_cross_entropy_fwd, shared by the CPU launcher
// (cross_entropy_cpu.cpp) and the CUDA launcher (cross_entropy_cuda.cu), so both devices accept
// and reject exactly the same calls. Host code only.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <optional>
#include <vector>

#include "../common/checks.h"

namespace fastattn {

// What the launchers need from the checked arguments.
struct CrossEntropyShape {
  int64_t classes;                   // C, dim 1 of the input
  std::vector<int64_t> token_shape;  // the input's shape without dim 1
  bool probability;                  // float targets (probabilities) rather than class indices
  at::ScalarType acc;                // accumulation dtype: double for float64 inputs, else float
};

// Every tensor is checked against the input's device and the input's shape; the options
// against their ranges.
inline CrossEntropyShape check_cross_entropy_args(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t reduction, double label_smoothing, double z_loss, double softcap,
    const std::optional<at::Tensor>& grad) {
  check_kernel_float(input.scalar_type(), "input");
  TORCH_CHECK(input.dim() >= 2, "input must be (N, C, d1, ...) with at least 2 dims, got shape ",
              input.sizes());
  CrossEntropyShape s;
  s.classes = input.size(1);
  TORCH_CHECK(s.classes > 0, "input must have at least one class (dim 1), got shape ",
              input.sizes());
  s.token_shape.assign(input.sizes().begin(), input.sizes().end());
  s.token_shape.erase(s.token_shape.begin() + 1);
  s.probability = at::isFloatingType(target.scalar_type());
  if (s.probability) {
    check_float_on(target, "target", input.device());
    TORCH_CHECK(target.sizes() == input.sizes(), "probability target must have the input's shape ",
                input.sizes(), ", got ", target.sizes());
  } else {
    check_device(target, "target", input.device());
    TORCH_CHECK(at::isIntegralType(target.scalar_type(), /*includeBool=*/false),
                "target must hold integer class indices or float probabilities, got ",
                target.scalar_type());
    TORCH_CHECK(target.sizes() == at::IntArrayRef(s.token_shape), "class-index target must have "
                "shape ", at::IntArrayRef(s.token_shape), ", got ", target.sizes());
  }
  s.acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (weight.has_value()) {
    check_float_on(*weight, "weight", input.device());
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == s.classes, "weight must have shape (",
                s.classes, ",), got ", weight->sizes());
  }
  TORCH_CHECK(reduction >= 0 && reduction <= 2,
              "reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  TORCH_CHECK(label_smoothing >= 0 && label_smoothing <= 1,
              "label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(std::isfinite(z_loss) && z_loss >= 0, "z_loss must be finite and >= 0, got ",
              z_loss);
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, "softcap must be finite and >= 0 (0: off), "
              "got ", softcap);
  if (grad.has_value()) {
    check_device(*grad, "grad", input.device());
    TORCH_CHECK(grad->sizes() == input.sizes() && grad->scalar_type() == input.scalar_type(),
                "grad must have the input's shape ", input.sizes(), " and dtype ",
                input.scalar_type(), ", got ", grad->sizes(), " ", grad->scalar_type());
  }
  return s;
}

// What both launchers of native_cross_entropy_fwd work on, after the checks: the weight in the
// accumulation dtype (contiguous; undefined without one), the target as the kernels read it
// (probabilities as given, class indices as int64) and the token count.
struct CrossEntropyInputs : CrossEntropyShape {
  at::Tensor w;
  at::Tensor t;
  int64_t tokens;
};

inline CrossEntropyInputs prepare_cross_entropy(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t reduction, double label_smoothing, double z_loss, double softcap,
    const std::optional<at::Tensor>& grad) {
  CrossEntropyInputs in{check_cross_entropy_args(input, target, weight, reduction,
                                                 label_smoothing, z_loss, softcap, grad),
                        at::Tensor(), at::Tensor(), 0};
  if (weight.has_value()) in.w = weight->to(in.acc).contiguous();
  in.t = in.probability ? target : target.to(at::kLong);
  in.tokens = input.numel() / in.classes;
  return in;
}

}  // namespace fastattn
