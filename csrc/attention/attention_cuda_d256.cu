// The native CUDA attention kernels and launch logic at padded head dim 256, forward and
// backward (attention_cuda_launcher.cuh says why each head dim has a file).

#include "attention_cuda_launcher.cuh"

namespace fastattn::cuda::attention {

FASTATTN_RUN_HEAD_DIM(template, 256);

}  // namespace fastattn::cuda::attention
