// The CUDA launcher of the native softmax ops: fastattn::native_softmax_fwd / native_softmax_bwd
// for CUDA tensors, on the current stream of the tensor's device. The kernels, their design and
// the launch logic are softmax_cuda.cuh.

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "softmax_cuda.cuh"

namespace fastattn::cuda {
namespace {

at::Tensor softmax_fwd_cuda(const at::Tensor& input, int64_t dim, double scale,
                            const std::optional<at::Tensor>& mask, bool causal, bool log,
                            at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(input.device());
  return softmax::softmax_fwd_impl<CudaRowLauncher>(input, dim, scale, mask, causal, log,
                                                    out_dtype);
}

at::Tensor softmax_bwd_cuda(const at::Tensor& grad_output, const at::Tensor& output, int64_t dim,
                            double scale, const std::optional<at::Tensor>& mask, bool causal,
                            bool log, at::ScalarType input_dtype) {
  const c10::cuda::CUDAGuard guard(output.device());
  return softmax::softmax_bwd_impl<CudaRowLauncher>(grad_output, output, dim, scale, mask,
                                                    causal, log, input_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("native_softmax_fwd", &softmax_fwd_cuda);
  m.impl("native_softmax_bwd", &softmax_bwd_cuda);
}

}  // namespace fastattn::cuda
