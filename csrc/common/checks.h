// Argument checks shared by the C++ entry points: every message names the tensor and what was
// expected. fastattn.functional validates user input before any launch; these checks guard the
// ops when they are called directly (torch.ops.fastattn.native_*).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fastattn {

inline bool is_kernel_float(c10::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_cpu_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor (the native backend has no ",
              t.device().type(), " kernels yet), got a tensor on ", t.device());
  TORCH_CHECK(is_kernel_float(t.scalar_type()), name,
              " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

// `mask` broadcasts to `shape` (numpy rules, aligned on the trailing dims).
inline void check_broadcasts(const at::Tensor& mask, at::IntArrayRef shape, const char* name) {
  const int64_t offset = static_cast<int64_t>(shape.size()) - mask.dim();
  bool ok = offset >= 0;
  for (int64_t d = 0; ok && d < mask.dim(); ++d) {
    ok = mask.size(d) == 1 || mask.size(d) == shape[offset + d];
  }
  TORCH_CHECK(ok, name, " of shape ", mask.sizes(), " does not broadcast to ", shape);
}

}  // namespace fastattn
