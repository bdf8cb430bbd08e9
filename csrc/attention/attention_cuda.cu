// The native attention ops for CUDA tensors: fastattn::native_attention_fwd /
// native_attention_bwd on the current stream of q's device. The kernels, their design and the
// launch logic are attention_cuda.cuh; the launcher attention_cuda_launcher.cuh, the kernels of
// each head dim compiled in attention_cuda_d<kD>.cu.

#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "attention_cuda_launcher.cuh"

namespace fastattn::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& seed,
    double dropout_p, double scale, int64_t window_left, int64_t window_right, bool align_bottom,
    double softcap) {
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor, got a tensor on ", q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  return attention::attention_fwd_impl<CudaLauncher>(q, k, v, mask, seed, dropout_p, scale,
                                                     window_left, window_right, align_bottom,
                                                     softcap);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& seed, double dropout_p, double scale, int64_t window_left,
    int64_t window_right, bool align_bottom, double softcap, bool mask_grad) {
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor, got a tensor on ", q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  return attention::attention_bwd_impl<CudaLauncher>(grad_out, q, k, v, out, lse, mask, seed,
                                                     dropout_p, scale, window_left, window_right,
                                                     align_bottom, softcap, mask_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("native_attention_fwd", &attention_fwd_cuda);
  m.impl("native_attention_bwd", &attention_bwd_cuda);
}

}  // namespace fastattn::cuda
