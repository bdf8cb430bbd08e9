// The launch logic of csrc/softmax/softmax_cuda.cuh and csrc/cross_entropy/cross_entropy_cuda.cuh
// with a launcher that runs their kernels in the CPU emulation of emulation.h: the CUDA code path
// of native_softmax_fwd / _bwd and native_cross_entropy_fwd on CPU tensors, for
// tests/test_cuda_emulation.py (built there with torch.utils.cpp_extension; also with
// -fsanitize=thread for test_emulated_cuda_kernels_are_race_free).
#include <torch/extension.h>

#define FASTATTN_CUDA_EMULATION 1
#include "emulation.h"
// emulation.h first: it defines what the headers take from CUDA
#include "cross_entropy/cross_entropy_cuda.cuh"
#include "softmax/softmax_cuda.cuh"

namespace cuda = fastattn::cuda;

struct EmulatedRowLauncher {
  // Three blocks: the grid-stride loops then give a block several rows, with rows left over.
  static unsigned max_blocks() { return 3; }

  template <typename Args>
  static void launch(void (*kernel)(Args), unsigned blocks, int threads, const Args& a) {
    emu::run_grid(dim3(blocks), threads, [&] { kernel(a); }, []() noexcept {});
  }
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("softmax_fwd", &cuda::softmax::softmax_fwd_impl<EmulatedRowLauncher>);
  m.def("softmax_bwd", &cuda::softmax::softmax_bwd_impl<EmulatedRowLauncher>);
  m.def("cross_entropy_fwd", &cuda::cross_entropy::cross_entropy_fwd_impl<EmulatedRowLauncher>);
}
