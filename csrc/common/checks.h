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

// `t` is on `device`, the device of the tensor the op runs on (the dispatcher picked the
// kernel by that tensor's device; every other tensor must follow it).
inline void check_device(const at::Tensor& t, const char* name, const c10::Device& device) {
  TORCH_CHECK(t.device() == device, name, " must be on ", device,
              " (the device of the op's input), got a tensor on ", t.device());
}

inline void check_kernel_float(c10::ScalarType t, const char* name) {
  TORCH_CHECK(is_kernel_float(t), name, " must be float32, float64, float16 or bfloat16, got ", t);
}

// `t` is a float tensor of a kernel dtype on `device`.
inline void check_float_on(const at::Tensor& t, const char* name, const c10::Device& device) {
  check_device(t, name, device);
  check_kernel_float(t.scalar_type(), name);
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
