// The CUDA launcher of fastattn::native_cross_entropy_fwd for CUDA tensors, on the current
// stream of the input's device. The kernel, its design and the launch logic are
// cross_entropy_cuda.cuh.

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cross_entropy_cuda.cuh"

namespace fastattn::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, int64_t reduction, double label_smoothing, double z_loss,
    double softcap, const std::optional<at::Tensor>& grad) {
  const c10::cuda::CUDAGuard guard(input.device());
  return cross_entropy::cross_entropy_fwd_impl<CudaRowLauncher>(
      input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("native_cross_entropy_fwd", &cross_entropy_fwd_cuda);
}

}  // namespace fastattn::cuda
