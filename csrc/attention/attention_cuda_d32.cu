// The native CUDA attention kernels and launch logic at padded head dim 32, forward and
// backward (attention_cuda_launcher.cuh says why each head dim has a file).

#include "attention_cuda_launcher.cuh"

namespace fastattn::cuda::attention {

template void run_head_dim<CudaLauncher, true, 32>(at::ScalarType, const AttnParams&);
template void run_head_dim<CudaLauncher, false, 32>(at::ScalarType, const AttnParams&);

}  // namespace fastattn::cuda::attention
