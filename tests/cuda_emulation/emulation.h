// A CPU emulation of the CUDA execution model, enough of it to run the kernels of
// csrc/attention/attention_cuda.cuh, csrc/softmax/softmax_cuda.cuh and
// csrc/cross_entropy/cross_entropy_cuda.cuh unchanged on a machine without a GPU (tests/
// test_cuda_emulation.py): one OS thread per CUDA thread, CTAs one after another, dynamic shared
// memory one global buffer (filled with 0xFF, a NaN pattern, before each CTA, so a read of
// shared memory nothing wrote shows up), __syncthreads / __syncwarp as barriers, and the warp
// collectives -- ldmatrix (plain and .trans), mma.sync m16n8k16 (bf16/fp16 in, fp32 out),
// shuffles -- computed from the PTX ISA's fragment layouts (see csrc/common/mma.cuh) with every
// lane's operands exchanged through per-warp slots between two barriers. cp.async copies (or
// zero-fills) at once, so it checks what the kernels compute, not their timing: races are
// compute-sanitizer's job on a GPU (benchmarks/sanitize_cuda.py); out-of-bounds accesses show
// up here under AddressSanitizer (see attention.cpp).
// Static __shared__ arrays (FASTATTN_BLOCK_SHARED) are function-local statics. What it replaces,
// the headers leave out under FASTATTN_CUDA_EMULATION: csrc/common/mma.cuh's PTX and
// csrc/common/cuda_rows.cuh's CUDA runtime launcher.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
#include <algorithm>
#include <atomic>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ATen/core/Tensor.h>

#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__
#define __align__(x)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct __nv_bfloat16 { uint16_t x; };
struct __half { uint16_t x; };

inline thread_local dim3 threadIdx;
inline dim3 blockIdx, blockDim, gridDim;  // CTAs run one after another

// A block's static __shared__ array: one per kernel instantiation, shared by the block's threads.
#define FASTATTN_BLOCK_SHARED static
// A misaligned vector access faults on a GPU (and, as an aligned SSE load, would segfault
// here): the access is skipped and counted instead, and run_grid raises after the grid (an
// exception cannot leave the emulated threads). The macro prefixes the access statement.
namespace emu {
inline std::atomic<int64_t> misaligned{0};
}
#define FASTATTN_ALIGNED_ACCESS(ptr, bytes)                 \
  if (reinterpret_cast<uintptr_t>(ptr) % (bytes) != 0) {    \
    ++emu::misaligned;                                       \
  } else

namespace emu {
struct Warp {
  std::barrier<> bar{32};
  const void* addr[32];
  uint32_t a[32][4];
  uint32_t b[32][2];
  double f[32];  // shuffle slots
};
inline std::vector<std::unique_ptr<Warp>> warps;
inline std::unique_ptr<std::barrier<>> cta;
inline Warp& warp() { return *warps[threadIdx.x / 32]; }
inline int lane() { return threadIdx.x % 32; }
// 16-bit patterns of bfloat16 / float16 to float and back (round to nearest even, as the
// cvt.rn instructions behind __floats2bfloat162_rn / __floats2half2_rn).
inline float bits_to_float(uint16_t v, bool bf16) {
  if (bf16) {
    const uint32_t u = uint32_t(v) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  _Float16 h;
  std::memcpy(&h, &v, 2);
  return float(h);
}
inline uint16_t float_to_bits(float f, bool bf16) {
  if (bf16) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if (std::isnan(f)) return 0x7FC0;
    u += 0x7FFF + ((u >> 16) & 1);
    return uint16_t(u >> 16);
  }
  const _Float16 h = _Float16(f);
  uint16_t v;
  std::memcpy(&v, &h, 2);
  return v;
}
}  // namespace emu

inline void __syncthreads() { emu::cta->arrive_and_wait(); }
inline void __syncwarp() { emu::warp().bar.arrive_and_wait(); }
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int m) {
  static_assert(sizeof(T) <= sizeof(double), "one shuffle slot holds 8 bytes");
  auto& w = emu::warp(); int l = emu::lane();
  std::memcpy(&w.f[l], &v, sizeof(T)); w.bar.arrive_and_wait();
  T r; std::memcpy(&r, &w.f[l ^ m], sizeof(T)); w.bar.arrive_and_wait();
  return r;
}

namespace emu {
// Runs `body` as every thread of every CTA of `grid` (threads per CTA), CTA after CTA; each CTA
// gets fresh warps and barriers. `before_cta` runs before each CTA's threads start.
template <typename Body, typename BeforeCta>
void run_grid(dim3 grid, int threads, Body body, BeforeCta before_cta) {
  TORCH_CHECK(threads % 32 == 0 && threads <= 1024, "bad block size ", threads);
  gridDim = grid;
  blockDim = dim3(threads);
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        before_cta();
        warps.clear();
        for (int w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<Warp>());
        cta = std::make_unique<std::barrier<>>(threads);
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            threadIdx = dim3(t);
            body();
          });
        }
        for (auto& thread : pool) thread.join();
      }
    }
  }
  const int64_t bad = misaligned.exchange(0);
  TORCH_CHECK(bad == 0, bad, " misaligned vector accesses (a misaligned-address fault on a GPU)");
}
}  // namespace emu

namespace fastattn::cuda {
using std::min;
using std::max;

template <typename T> constexpr bool is_bf16 = std::is_same_v<T, __nv_bfloat16>;

// D += A B for one m16n8k16 tile: lane (g, t) holds the A, B, C elements at the positions the
// PTX ISA gives (csrc/common/mma.cuh); each lane computes its four D elements from every
// lane's A and B registers.
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  auto& w = emu::warp(); int l = emu::lane();
  for (int i = 0; i < 4; ++i) w.a[l][i] = a[i];
  w.b[l][0] = b0; w.b[l][1] = b1;
  w.bar.arrive_and_wait();
  auto A = [&](int r, int c) {  // PTX A layout
    int g = r % 8, reg = (r >= 8 ? 1 : 0) + (c >= 8 ? 2 : 0), t = (c % 8) / 2;
    uint32_t v = w.a[4 * g + t][reg];
    return emu::bits_to_float(uint16_t(c % 2 ? v >> 16 : v & 0xFFFF), is_bf16<T>);
  };
  auto B = [&](int k, int n) {  // PTX B layout
    int t = (k % 8) / 2; uint32_t v = w.b[4 * n + t][k >= 8 ? 1 : 0];
    return emu::bits_to_float(uint16_t(k % 2 ? v >> 16 : v & 0xFFFF), is_bf16<T>);
  };
  int g = l >> 2, t = l & 3;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    int r = g + (i >= 2 ? 8 : 0), c = 2 * t + (i & 1);
    float acc = d[i];
    for (int k = 0; k < 16; ++k) acc += A(r, k) * B(k, c);
    out[i] = acc;
  }
  w.bar.arrive_and_wait();
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// ldmatrix.x4: lanes 8m .. 8m + 7 give the row addresses of matrix m; lane (g, t) receives row g,
// columns 2t, 2t + 1 of matrix m in register m, or with .trans rows 2t, 2t + 1 at column g.
inline void ldmatrix_impl(uint32_t (&r)[4], const void* p, bool trans) {
  auto& w = emu::warp(); int l = emu::lane();
  w.addr[l] = p; w.bar.arrive_and_wait();
  int g = l >> 2, t = l & 3;
  for (int m = 0; m < 4; ++m) {
    uint16_t lo, hi;
    if (!trans) {
      const uint16_t* row = static_cast<const uint16_t*>(w.addr[8 * m + g]);
      lo = row[2 * t]; hi = row[2 * t + 1];
    } else {
      lo = static_cast<const uint16_t*>(w.addr[8 * m + 2 * t])[g];
      hi = static_cast<const uint16_t*>(w.addr[8 * m + 2 * t + 1])[g];
    }
    r[m] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
  w.bar.arrive_and_wait();
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { ldmatrix_impl(r, p, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { ldmatrix_impl(r, p, true); }

inline void cp_async_16(void* dst, const void* src, int bytes) {
  std::memset(dst, 0, 16);
  if (bytes > 0) std::memcpy(dst, src, bytes);
}
inline void cp_async_commit() {}
template <int N> inline void cp_async_wait() {}

template <typename T> inline uint32_t pack2(float lo, float hi) {
  return uint32_t(emu::float_to_bits(lo, is_bf16<T>)) |
         (uint32_t(emu::float_to_bits(hi, is_bf16<T>)) << 16);
}
template <typename T> inline float to_float(T x) { return emu::bits_to_float(x.x, is_bf16<T>); }

namespace attention {
alignas(16) inline unsigned char smem[256 * 1024];
}
}  // namespace fastattn::cuda
