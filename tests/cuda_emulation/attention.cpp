// The attention launch logic of csrc/attention/attention_cuda.cuh with a launcher that runs the
// kernels in the CPU emulation of emulation.h: native_attention_fwd / _bwd's CUDA code path on
// CPU tensors, for tests/test_cuda_emulation.py (built there with torch.utils.cpp_extension).
// Built with -fsanitize=thread (and libtsan preloaded), ThreadSanitizer reports data races
// between the kernels' CUDA threads (test_emulated_cuda_kernels_are_race_free). Built with
// -fsanitize=address (and libasan preloaded), AddressSanitizer checks every global and shared
// memory access of the kernels against the tensors' and the launch's bounds.
#include <torch/extension.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

#define FASTATTN_CUDA_EMULATION 1
#include "emulation.h"
// emulation.h first: it defines what the header takes from CUDA
#include "attention/attention_cuda.cuh"

namespace attention = fastattn::cuda::attention;

// Whether the launch logic picks the Hopper kernels (attention_fwd_kernel<T, kD, true>), as
// CudaLauncher does on an H100, set by use_wgmma; and among them the TMA kernels
// (attention_fwd_tma_kernel from head dim 64 up, attention_bwd_dq_tma_kernel and
// attention_bwd_dkdv_tma_kernel from 96 up), as CudaLauncher does unless FASTATTN_CUDA_TMA=0, set
// by use_tma; whether the TMA forward's warpgroups take turns on the tensor cores
// (TensorCoreTurns), as CudaLauncher does unless FASTATTN_CUDA_PINGPONG=0, set by use_turns.
inline bool wgmma_kernels = false;
inline bool tma_forward = true;
inline bool tma_turns = true;

struct EmulatedLauncher {
  static bool wgmma() { return wgmma_kernels; }
  static bool tma() { return tma_forward; }
  static bool turns() { return tma_turns; }
  static void encode(CUtensorMap* map, const attention::TmaBox& t) {
    emu::encode_tensor_map(map, t.base, t.dims, t.strides, t.box, t.swizzle);
  }

  template <typename Kernel, typename Params>
  static void launch(Kernel kernel, dim3 grid, int threads, size_t smem, const Params& p) {
    TORCH_CHECK(smem <= sizeof(attention::smem), "emulated shared memory is too small");
    TORCH_CHECK(smem <= 227 * 1024, smem, " bytes of shared memory exceed an H100's 227 KB");
    emu::run_grid(grid, threads, [&] { kernel(p); }, [&]() noexcept {
#if defined(__SANITIZE_ADDRESS__)
      ASAN_UNPOISON_MEMORY_REGION(attention::smem, sizeof(attention::smem));
#endif
      std::memset(attention::smem, 0xFF, smem);
#if defined(__SANITIZE_ADDRESS__)
      // Built with -fsanitize=address, shared memory past the launch's dynamic size is
      // poisoned: an access beyond the tiles the kernel asked for is reported.
      ASAN_POISON_MEMORY_REGION(attention::smem + smem, sizeof(attention::smem) - smem);
#endif
    });
  }
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention_fwd", &attention::attention_fwd_impl<EmulatedLauncher>);
  m.def("attention_bwd", &attention::attention_bwd_impl<EmulatedLauncher>);
  m.def("use_wgmma", [](bool on) { wgmma_kernels = on; });
  m.def("use_tma", [](bool on) { tma_forward = on; });
  m.def("use_turns", [](bool on) { tma_turns = on; });
}
