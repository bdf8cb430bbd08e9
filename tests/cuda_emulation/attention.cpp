// The attention launch logic of csrc/attention/attention_cuda.cuh with a launcher that runs the
// kernels in the CPU emulation of emulation.h: native_attention_fwd / _bwd's CUDA code path on
// CPU tensors, for tests/test_cuda_emulation.py (built there with torch.utils.cpp_extension).
// Built with -fsanitize=thread (and libtsan preloaded), ThreadSanitizer reports data races
// between the kernels' CUDA threads (test_emulated_cuda_attention_is_race_free). Built with
// -fsanitize=address (and libasan preloaded), AddressSanitizer checks every global and shared
// memory access of the kernels against the tensors' and the launch's bounds.
#include <torch/extension.h>

#include <barrier>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#endif

#define FASTATTN_CUDA_EMULATION 1
#include "emulation.h"
// emulation.h first: it defines what the header takes from CUDA
#include "attention/attention_cuda.cuh"

namespace attention = fastattn::cuda::attention;

struct EmulatedLauncher {
  // Runs the grid's CTAs one after another (blockIdx.x fastest) on one set of `threads` OS
  // threads, created once per launch: creating threads is what ThreadSanitizer slows most.
  // Between two CTAs every thread waits at `next_block`, whose completion step, run once by the
  // last thread to arrive, sets up the next CTA (a std::barrier is exact enough there: whatever
  // it orders, the CTA boundary orders anyway).
  template <typename Kernel>
  static void launch(Kernel kernel, dim3 grid, int threads, size_t smem,
                     const attention::AttnParams& p) {
    TORCH_CHECK(smem <= sizeof(attention::smem), "emulated shared memory is too small");
    TORCH_CHECK(smem <= 227 * 1024, smem, " bytes of shared memory exceed an H100's 227 KB");
    TORCH_CHECK(threads % 32 == 0 && threads <= 1024, "bad block size ", threads);
    const int64_t blocks = int64_t(grid.x) * grid.y * grid.z;
    auto block_idx = [&](int64_t i) {
      return dim3(i % grid.x, i / grid.x % grid.y, i / grid.x / grid.y);
    };
    int64_t block = 0;
    auto start_block = [&]() noexcept {
      if (block == blocks) return;
      blockIdx = block_idx(block);
#if defined(__SANITIZE_ADDRESS__)
      ASAN_UNPOISON_MEMORY_REGION(attention::smem, sizeof(attention::smem));
#endif
      std::memset(attention::smem, 0xFF, smem);
#if defined(__SANITIZE_ADDRESS__)
      // Built with -fsanitize=address, shared memory past the launch's dynamic size is
      // poisoned: an access beyond the tiles the kernel asked for is reported.
      ASAN_POISON_MEMORY_REGION(attention::smem + smem, sizeof(attention::smem) - smem);
#endif
      emu::warps.clear();
      for (int w = 0; w < threads / 32; ++w) emu::warps.push_back(std::make_unique<emu::Warp>());
      emu::cta = std::make_unique<emu::Barrier>(threads);
    };
    start_block();
    std::barrier next_block(threads, [&]() noexcept {
      ++block;
      start_block();
    });
    // Per thread (one element each, no shared writes): the first CTA it left with cp.async
    // copies no cp_async_wait covered, or -1.
    std::vector<int64_t> unwaited(threads, -1);
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        threadIdx = dim3(t);
        for (int64_t i = 0; i < blocks; ++i) {
          kernel(p);
          if (emu::copies.pending() && unwaited[t] < 0) unwaited[t] = i;
          emu::copies = {};
          next_block.arrive_and_wait();
        }
      });
    }
    for (auto& thread : pool) thread.join();
    // Such a copy lands whenever the hardware gets to it, possibly over what the kernel wrote
    // there since (the epilogues stage their outputs in the Q tile).
    for (int t = 0; t < threads; ++t) {
      if (unwaited[t] >= 0) {
        const dim3 b = block_idx(unwaited[t]);
        TORCH_CHECK(false, "thread ", t, " of block (", b.x, ", ", b.y, ", ", b.z,
                    ") exited with cp.async copies that no cp_async_wait covered");
      }
    }
  }
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention_fwd", &attention::attention_fwd_impl<EmulatedLauncher>);
  m.def("attention_bwd", &attention::attention_bwd_impl<EmulatedLauncher>);
}
