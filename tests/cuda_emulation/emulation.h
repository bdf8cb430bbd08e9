// A CPU emulation of the CUDA execution model, enough of it to run the kernels of
// csrc/attention/attention_cuda.cuh, csrc/softmax/softmax_cuda.cuh and
// csrc/cross_entropy/cross_entropy_cuda.cuh unchanged on a machine without a GPU (tests/
// test_cuda_emulation.py): one OS thread per CUDA thread, CTAs one after another, dynamic shared
// memory one global buffer (filled with 0xFF, a NaN pattern, before each CTA, so a read of
// shared memory nothing wrote shows up), __syncthreads / __syncwarp as barriers, and the warp
// collectives -- ldmatrix (plain and .trans), mma.sync m16n8k16 (bf16/fp16 in, fp32 out),
// shuffles, Hopper's wgmma.mma_async -- computed from the PTX ISA's fragment and shared-memory
// layouts (see csrc/common/mma.cuh; wgmma's in wgmma_isa.h, checked against CuTe by
// cute_check.cu) with every lane's operands exchanged through per-warp slots between two
// barriers. wgmma is as asynchronous as PTX allows: an MMA is computed, from shared
// memory as it is then, at the wgmma_wait that covers its group (accumulators read before it
// hold stale values, a stage refilled before it gives wrong numbers). cp.async is as
// asynchronous as PTX allows (see cp_async_16): its destination holds NaN from the issue until
// the wait_group that covers it, so a tile read too early gives wrong numbers. For the Hopper
// TMA kernels: mbarriers (arrivals, transaction bytes, phases), TMA box loads of a tensor map
// (cp.async.bulk.tensor, with the driver's encode checks), named barriers (bar.sync and
// bar.arrive; a wait of two minutes aborts as a deadlock, and a CTA that leaves one with
// arrivals pending fails the launch).
// Built with -fsanitize=thread it is also a race checker: ThreadSanitizer sees the barriers as
// happens-before edges and checks every shared and global memory access of the kernels, so a
// missing __syncthreads, __syncwarp or cp_async_wait, or a stage refilled while another warp
// still reads it, is a data race it reports. Out-of-bounds accesses show up under
// AddressSanitizer (see attention.cpp). Not checked here: races between CTAs (they run one
// after another), timing and hardware limits; compute-sanitizer on a GPU covers those
// (benchmarks/sanitize_cuda.py). Linux only (the barriers sleep on futexes).
// Static __shared__ arrays (FASTATTN_BLOCK_SHARED) are function-local statics; a misaligned
// vector access (FASTATTN_ALIGNED_ACCESS) fails the launch, as it faults on a GPU. What it
// replaces, the headers leave out under FASTATTN_CUDA_EMULATION: csrc/common/mma.cuh's PTX and
// csrc/common/cuda_rows.cuh's CUDA runtime launcher.
#pragma once
#include <atomic>
#include <barrier>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <chrono>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>
#include <algorithm>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <ATen/core/Tensor.h>

#include "wgmma_isa.h"

#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(x)
#define __grid_constant__
// The emulation's own exchanges between lanes (through barriers) are not the kernels' memory
// accesses: ThreadSanitizer neither checks them nor slows down on them.
#define EMU_UNCHECKED __attribute__((no_sanitize("thread")))

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
// here): the access is skipped and counted instead, and run_grid fails the launch (an exception
// cannot leave the emulated threads). The macro prefixes the access statement.
namespace emu {
inline std::atomic<int64_t> misaligned{0};
}
#define FASTATTN_ALIGNED_ACCESS(ptr, bytes)              \
  if (reinterpret_cast<uintptr_t>(ptr) % (bytes) != 0) { \
    ++emu::misaligned;                                   \
  } else

#if defined(__SANITIZE_THREAD__)  // ThreadSanitizer's runtime (-fsanitize=thread)
extern "C" void __tsan_read_range(void* addr, unsigned long size);
extern "C" void __tsan_write_range(void* addr, unsigned long size);
extern "C" void* __tsan_get_current_fiber();
extern "C" void* __tsan_create_fiber(unsigned flags);
extern "C" void __tsan_destroy_fiber(void* fiber);
extern "C" void __tsan_switch_to_fiber(void* fiber, unsigned flags);
#endif

namespace emu {
// A reusable barrier of n threads (std::barrier's arrive_and_wait) whose only synchronisation
// is its own two atomics, so that ThreadSanitizer's happens-before edges are exactly the
// kernel's barriers. std::barrier and std::atomic::wait park waiters in libstdc++'s waiter
// pool, whose counters are shared by unrelated addresses: through them one warp's barrier
// ordered another warp's accesses and hid races. Waiters yield a few times, then sleep on a
// futex, polling with relaxed loads (an acquire load costs TSan a join of vector clocks as long
// as the thread count), and acquire the new phase once.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  // bar.sync. With `timed` (named barriers, whose counts the kernels must balance between
  // warpgroups), a wait of two minutes is a deadlock and stops the process, as an mbarrier's.
  void arrive_and_wait(bool timed = false) {
    const unsigned phase = phase_.load(std::memory_order_relaxed);
    if (!arrive_at(phase)) {
      for (int i = 0; i < 8 && phase_.load(std::memory_order_relaxed) == phase; ++i) {
        std::this_thread::yield();
      }
      const auto start = std::chrono::steady_clock::now();
      const timespec poll{0, 50'000'000};
      while (phase_.load(std::memory_order_relaxed) == phase) {
        syscall(SYS_futex, &phase_, FUTEX_WAIT_PRIVATE, phase, timed ? &poll : nullptr, nullptr,
                0);
        if (timed && std::chrono::steady_clock::now() - start > std::chrono::minutes(2)) {
          std::fprintf(stderr, "emulation: named barrier wait (%d threads) deadlocked\n", n_);
          std::abort();
        }
      }
      (void)phase_.load(std::memory_order_acquire);
    }
  }
  // bar.arrive: counts toward the phase without waiting for it.
  void arrive() { (void)arrive_at(phase_.load(std::memory_order_relaxed)); }
  int threads() const { return n_; }
  // Arrivals of a phase not yet complete.
  int pending() const { return arrived_.load(std::memory_order_relaxed); }

 private:
  // One arrival; true for the one that completes the phase (it starts the next). The count
  // drops by n rather than to 0, so a bar.arrive toward the next phase that lands before the
  // drop still counts.
  bool arrive_at(unsigned phase) {
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 != n_) return false;
    arrived_.fetch_sub(n_, std::memory_order_relaxed);
    phase_.store(phase + 1, std::memory_order_release);
    syscall(SYS_futex, &phase_, FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
    return true;
  }

  const int n_;
  std::atomic<int> arrived_{0};
  std::atomic<unsigned> phase_{0};
  static_assert(sizeof(std::atomic<unsigned>) == 4, "a futex word is 32 bits");
};

struct Warp {
  Barrier bar{32};
  uint16_t rows[32][8];  // ldmatrix: each lane's row
  uint32_t a[32][4];
  uint32_t b[32][2];
  double f[32];  // shuffle slots
};
inline std::vector<std::unique_ptr<Warp>> warps;
inline std::unique_ptr<Barrier> cta;
// This CUDA thread's cp.async copies not yet performed: those issued since the last commit and
// the committed groups, oldest first (see cp_async_16).
struct Copy {
  void* dst;
  const void* src;
  int bytes;
};
// Asynchronous operations of one thread: those issued since the last commit, and the
// committed groups, oldest first.
template <typename Op>
struct AsyncGroups {
  std::vector<Op> open;
  std::deque<std::vector<Op>> committed;
  bool pending() const {
    return !open.empty() || std::any_of(committed.begin(), committed.end(),
                                        [](const auto& group) { return !group.empty(); });
  }
  void commit() {
    committed.push_back(std::move(open));
    open.clear();
  }
  // Performs every committed group but the newest n, oldest first (a wait_group n).
  template <typename F>
  void complete_all_but(size_t n, F perform) {
    while (committed.size() > n) {
      for (const Op& op : committed.front()) perform(op);
      committed.pop_front();
    }
  }
};
inline thread_local AsyncGroups<Copy> copies;
// This CUDA thread's wgmma.mma_async operations not yet performed (see wgmma_ss), grouped as
// cp.async's copies are. `d` is the thread's accumulator fragment (n / 2 floats).
struct Wgmma {
  float* d;
  int n;
  bool scale_d, bf16, a_in_smem, b_mn_major;
  uint64_t desc_a, desc_b;
  uint16_t a[16][16];  // a register A operand: the warp's 16 rows (row % 16), k = 0..15
};
inline thread_local AsyncGroups<Wgmma> mmas;
// Descriptors the emulation cannot read (a base offset): counted, and the launch fails, as for
// a misaligned access.
inline std::atomic<int64_t> bad_descriptors{0};
// Declares to ThreadSanitizer an access the emulation makes on a CUDA thread's behalf with
// memset / memcpy: GCC expands those inline for a known size, out of its interceptors' sight.
inline void tsan_access([[maybe_unused]] const void* p, [[maybe_unused]] size_t n,
                        [[maybe_unused]] bool write) {
#if defined(__SANITIZE_THREAD__)
  if (write) {
    __tsan_write_range(const_cast<void*>(p), n);
  } else {
    __tsan_read_range(const_cast<void*>(p), n);
  }
#endif
}
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

// A TMA tensor map as cuTensorMapEncodeTiled would encode it (emu::encode_tensor_map): 16-bit
// elements, five dims, innermost first, strides in bytes for dims 1-4.
struct alignas(64) CUtensorMap {
  const void* base;
  uint64_t dims[5];
  uint64_t strides[4];
  uint32_t box[5];
  uint32_t swizzle;  // span in bytes (32, 64, 128), 0 without
};

namespace emu {
// An mbarrier: one 64-bit word holding the arrivals still pending in this phase (bits 0-15),
// the phase count (16-31) and the transaction bytes still pending (32-63, two's complement);
// `count` arrivals a phase. Arrivals and complete-tx update it with release read-modify-writes and
// waits read it with acquire loads, so ThreadSanitizer sees what the PTX memory model gives: a
// thread whose wait saw a phase complete is ordered after every arrival of that phase and after
// the writes of the copies it counted, and arrivals are not ordered with one another.
// A TMA box load not yet performed (the non-TSan emulation's, see tma_load).
struct TmaCopy {
  void* dst;
  CUtensorMap map;  // by value: the issuing thread's parameters may be gone when it lands
  int c[5];
};
struct Mbar {
  std::atomic<uint64_t> state{0};
  uint32_t count = 0;
  std::mutex lock;               // guards `copies`
  std::vector<TmaCopy> copies;   // issued on this barrier, not yet landed
  std::atomic<size_t> queued{0};  // copies.size(), read without the lock by a polling wait
};
// A CTA's mbarriers by shared-memory offset (set up by mbar_init, cleared between CTAs), its
// named barriers (bar.sync id, count) made at their first use, and the launch's faults that a
// GPU would report (the launch fails on any).
inline Mbar mbars[16];
inline uint32_t mbar_offsets[16];
inline int mbar_count = 0;
inline std::unique_ptr<Barrier> named[16];
inline std::mutex named_mutex;
inline std::atomic<int64_t> tma_faults{0};
// TMA copies a CTA left without a wait that made them land: on a GPU they would land in a CTA
// that has exited (or in the next one's shared memory); the launch fails.
inline void check_unwaited_copies() {
  for (auto& m : mbars) {
    if (!m.copies.empty()) ++tma_faults;
  }
}
// Named barriers a CTA left with arrivals of an incomplete phase (bar.arrive without the
// matching bar.sync, or a count that differs between uses): counted as faults, so a kernel's
// barrier protocol balances within each CTA.
inline std::atomic<int64_t> named_faults{0};
inline void check_named_barriers() {
  for (auto& b : named) {
    if (b && b->pending() != 0) ++named_faults;
  }
}
// Named barrier `id` of `threads` threads, made at its first use in the CTA; ids outside 1..15
// and a second thread count for one id are faults.
inline Barrier* named_barrier(int id, int threads) {
  if (id < 1 || id > 15 || threads % 32 != 0 || threads < 32) {
    ++named_faults;
    return nullptr;
  }
  std::lock_guard<std::mutex> lock(named_mutex);
  auto& slot = named[id];
  if (!slot) slot = std::make_unique<Barrier>(threads);
  if (slot->threads() != threads) {
    ++named_faults;
    return nullptr;
  }
  return slot.get();
}
inline void reset_cta_barriers() {
  for (auto& m : mbars) {
    m.state.store(0, std::memory_order_relaxed);
    m.count = 0;
    m.copies.clear();
    m.queued.store(0, std::memory_order_relaxed);
  }
  mbar_count = 0;
  for (auto& b : named) b.reset();
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
// Runs body() as every thread of every CTA of `grid` (`threads` a CTA), CTAs one after another
// (blockIdx.x fastest) on one set of OS threads, created once per launch: creating threads is
// what ThreadSanitizer slows most. Between two CTAs every thread waits at `next_block`, whose
// completion step, run once by the last thread to arrive, sets up the next CTA: fresh warps and
// barriers, then before_cta() (a std::barrier is exact enough there: whatever it orders, the
// CTA boundary orders anyway). Fails the launch when a thread left a CTA with cp.async copies
// no cp_async_wait covered (such a copy lands whenever the hardware gets to it, possibly over
// what the kernel wrote there since), or when a vector access was misaligned.
template <typename Body, typename BeforeCta>
void run_grid(dim3 grid, int threads, Body body, BeforeCta before_cta) {
  TORCH_CHECK(threads % 32 == 0 && threads <= 1024, "bad block size ", threads);
  gridDim = grid;
  blockDim = dim3(threads);
  const int64_t blocks = int64_t(grid.x) * grid.y * grid.z;
  auto block_idx = [&](int64_t i) {
    return dim3(i % grid.x, i / grid.x % grid.y, i / grid.x / grid.y);
  };
  int64_t block = 0;
  auto start_block = [&]() noexcept {
    if (block == blocks) return;
    blockIdx = block_idx(block);
    warps.clear();
    for (int w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<Warp>());
    cta = std::make_unique<Barrier>(threads);
    reset_cta_barriers();
    before_cta();
  };
  start_block();
  std::barrier next_block(threads, [&]() noexcept {
    check_unwaited_copies();
    check_named_barriers();
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
        body();
        if ((copies.pending() || mmas.pending()) && unwaited[t] < 0) unwaited[t] = i;
        copies = {};
        mmas = {};
        next_block.arrive_and_wait();
      }
    });
  }
  for (auto& thread : pool) thread.join();
  const int64_t bad = misaligned.exchange(0);
  TORCH_CHECK(bad == 0, bad, " misaligned vector accesses (a misaligned-address fault on a GPU)");
  const int64_t tma = tma_faults.exchange(0);
  TORCH_CHECK(tma == 0, tma, " faults of mbarriers or TMA copies (an uninitialised or overfull "
              "mbarrier, a box destination not aligned to 128 bytes or its swizzle pattern, a "
              "box wholly outside its tensor, a copy no wait made land)");
  const int64_t named_bad = named_faults.exchange(0);
  TORCH_CHECK(named_bad == 0, named_bad, " named barriers left with arrivals pending at the end "
              "of a CTA (bar.arrive without the bar.sync it pairs with), or used with two thread "
              "counts");
  const int64_t desc = bad_descriptors.exchange(0);
  TORCH_CHECK(desc == 0, desc, " wgmma descriptors with a base offset, which this emulation "
              "does not read");
  for (int t = 0; t < threads; ++t) {
    if (unwaited[t] >= 0) {
      const dim3 b = block_idx(unwaited[t]);
      TORCH_CHECK(false, "thread ", t, " of block (", b.x, ", ", b.y, ", ", b.z,
                  ") exited with cp.async copies or wgmma operations that no wait covered");
    }
  }
}
}  // namespace emu

namespace fastattn::cuda {
using std::min;
using std::max;

template <typename T> constexpr bool is_bf16 = std::is_same_v<T, __nv_bfloat16>;

// D += A B for one m16n8k16 tile: lane (g, t) holds the A, B, C elements at the positions the
// PTX ISA gives (csrc/common/mma.cuh); each lane computes its four D elements from every
// lane's A and B registers, exchanged through the warp's slots.
template <typename T>
EMU_UNCHECKED inline void mma_lane(float (&out)[4], const float (&d)[4], const emu::Warp& w,
                                   int l) {
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
  for (int i = 0; i < 4; ++i) {
    int r = g + (i >= 2 ? 8 : 0), c = 2 * t + (i & 1);
    float acc = d[i];
    for (int k = 0; k < 16; ++k) acc += A(r, k) * B(k, c);
    out[i] = acc;
  }
}
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  auto& w = emu::warp(); int l = emu::lane();
  for (int i = 0; i < 4; ++i) w.a[l][i] = a[i];
  w.b[l][0] = b0; w.b[l][1] = b1;
  w.bar.arrive_and_wait();
  float out[4];
  mma_lane<T>(out, d, w, l);
  w.bar.arrive_and_wait();
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// ldmatrix.x4: lanes 8m .. 8m + 7 give the row addresses of matrix m; lane (g, t) receives row g,
// columns 2t, 2t + 1 of matrix m in register m, or with .trans rows 2t, 2t + 1 at column g.
EMU_UNCHECKED inline void ldmatrix_lane(uint32_t (&r)[4], const emu::Warp& w, int l, bool trans) {
  int g = l >> 2, t = l & 3;
  for (int m = 0; m < 4; ++m) {
    uint16_t lo, hi;
    if (!trans) {
      lo = w.rows[8 * m + g][2 * t];
      hi = w.rows[8 * m + g][2 * t + 1];
    } else {
      lo = w.rows[8 * m + 2 * t][g];
      hi = w.rows[8 * m + 2 * t + 1][g];
    }
    r[m] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
}
// Each lane reads the 16-byte row at its own address and takes its elements from the warp's
// rows: to ThreadSanitizer a warp reads each row once, through one thread, rather than as 16
// threads' 2-byte reads, which is cheaper and crowds less the four accesses it keeps per word.
inline void ldmatrix_impl(uint32_t (&r)[4], const void* p, bool trans) {
  auto& w = emu::warp(); int l = emu::lane();
  std::memcpy(w.rows[l], p, 16);
  emu::tsan_access(p, 16, false);
  w.bar.arrive_and_wait();
  ldmatrix_lane(r, w, l, trans);
  w.bar.arrive_and_wait();
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p) { ldmatrix_impl(r, p, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) { ldmatrix_impl(r, p, true); }

// cp.async as the PTX ISA defines it, and no more forgiving: a copy lands in shared memory at
// some point between its issue and the cp.async.wait_group that covers its group, so the
// emulation writes both ends of that window. At issue the 16 destination bytes become 0xFF (NaN
// in bf16, fp16 and fp32): a tile read before its wait reads NaN. The copy itself (and the zero
// fill past `bytes`) happens at the wait, by the issuing thread: a tile read before the barrier
// that follows the wait, or refilled while another warp still reads it, is a data race between
// two CUDA threads that ThreadSanitizer reports (test_cuda_emulation's TSan build).
// wait_group N completes every committed group but the newest N; copies not yet committed are
// not waited for at all.
inline void cp_async_16(void* dst, const void* src, int bytes) {
  std::memset(dst, 0xFF, 16);
  emu::tsan_access(dst, 16, true);
  emu::copies.open.push_back({dst, src, bytes});
}
inline void cp_async_commit() { emu::copies.commit(); }
template <int N> inline void cp_async_wait() {
  emu::copies.complete_all_but(N, [](const emu::Copy& c) {
    if (c.bytes > 0) std::memcpy(c.dst, c.src, c.bytes);
    std::memset(static_cast<unsigned char*>(c.dst) + c.bytes, 0, 16 - c.bytes);
    emu::tsan_access(c.src, c.bytes, false);
    emu::tsan_access(c.dst, 16, true);
  });
}

template <typename T> inline uint32_t pack2(float lo, float hi) {
  return uint32_t(emu::float_to_bits(lo, is_bf16<T>)) |
         (uint32_t(emu::float_to_bits(hi, is_bf16<T>)) << 16);
}
template <typename T> inline float to_float(T x) { return emu::bits_to_float(x.x, is_bf16<T>); }

namespace attention {
alignas(16) inline unsigned char smem[256 * 1024];
}

// Shared memory addresses are offsets into the one emulated buffer (18 bits, as a descriptor's).
inline uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - attention::smem);
}

// --- wgmma (mma.cuh's Hopper section) ------------------------------------------------------
inline void wgmma_fence() {}
inline void fence_proxy_async() {}
template <int N> inline void wgmma_fence_operands(float (&)[N]) {}
template <int M> inline void wgmma_fence_operands(float (&)[M][4]) {}

namespace wgmma_emu {
// Element (mn, k) of an operand in shared memory, read through its descriptor (wgmma_isa.h).
inline float desc_load(uint64_t desc, int mn, int k, bool mn_major, bool bf16) {
  const wgmma_isa::Descriptor d = wgmma_isa::decode(desc);
  if (d.base_offset != 0) ++emu::bad_descriptors;
  const unsigned char* p = attention::smem + wgmma_isa::smem_address(d, mn, k, mn_major);
  uint16_t v;
  std::memcpy(&v, p, 2);
  emu::tsan_access(p, 2, false);
  return emu::bits_to_float(v, bf16);
}

// Performs one wgmma for this thread: each of its accumulators (wgmma_isa::accumulator) is a
// dot product of a row of A (from shared memory, or the warp's registers gathered in op.a) and
// a column of B.
inline void wgmma_run(const emu::Wgmma& op) {
  const int thread = static_cast<int>(threadIdx.x % 128);
  for (int i = 0; i < op.n / 2; ++i) {
    const auto [row, col] = wgmma_isa::accumulator(thread, i);
    float acc = op.scale_d ? op.d[i] : 0.f;
    for (int k = 0; k < 16; ++k) {
      const float a = op.a_in_smem ? desc_load(op.desc_a, row, k, false, op.bf16)
                                   : emu::bits_to_float(op.a[row % 16][k], op.bf16);
      acc += a * desc_load(op.desc_b, col, k, op.b_mn_major, op.bf16);
    }
    op.d[i] = acc;
  }
}
}  // namespace wgmma_emu

template <typename T, int N>
inline void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  emu::Wgmma op{d, N, scale_d != 0, is_bf16<T>, true, false, desc_a, desc_b, {}};
  emu::mmas.open.push_back(op);
}

// The register A operand: the warp's lanes publish their four registers, and each thread
// gathers the warp's 16 rows of A from them (wgmma_isa::a_register says which value is which).
template <typename T, int N>
inline void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
  auto& w = emu::warp();
  const int l = emu::lane(), first = static_cast<int>(threadIdx.x % 128) - l;
  for (int i = 0; i < 4; ++i) w.a[l][i] = a[i];
  w.bar.arrive_and_wait();
  emu::Wgmma op{d, N, scale_d != 0, is_bf16<T>, false, true, 0, desc_b, {}};
  for (int src = 0; src < 32; ++src) {
    for (int v = 0; v < 8; ++v) {
      const auto [row, k] = wgmma_isa::a_register(first + src, v);
      const uint32_t r = w.a[src][v / 2];
      op.a[row % 16][k] = static_cast<uint16_t>(v % 2 ? r >> 16 : r & 0xFFFF);
    }
  }
  w.bar.arrive_and_wait();
  emu::mmas.open.push_back(op);
}

// --- mbarriers and TMA (mma.cuh's Hopper section) -------------------------------------------
namespace mbar_emu {
inline emu::Mbar* find(const void* bar) {
  const uint32_t offset = smem_addr(bar);
  for (int i = 0; i < emu::mbar_count; ++i) {
    if (emu::mbar_offsets[i] == offset) return &emu::mbars[i];
  }
  ++emu::tma_faults;  // an mbarrier no mbar_init set up
  return nullptr;
}
// One arrival (or none) and a change of the pending bytes, as one atomic add (a compare-exchange
// would write its expected value to the stack, which ThreadSanitizer's fibers of tma_load share
// with the issuing thread); the update that leaves neither pending completes the phase with a
// second add (arrivals back to the count, the phase count one up; nothing of the next phase can
// arrive before a waiter has seen this one complete). The phase count stays below 2^16: a CTA
// runs far fewer phases.
inline void update(emu::Mbar& m, uint32_t arrivals, int64_t tx) {
  const uint64_t delta = (static_cast<uint64_t>(tx) << 32) - arrivals;
  const uint64_t old = m.state.fetch_add(delta, std::memory_order_release);
  if ((old & 0xFFFF) < arrivals) {  // more arrivals than the barrier's count in one phase
    ++emu::tma_faults;
    return;
  }
  const uint64_t now = old + delta;
  if ((now & 0xFFFF) == 0 && (now >> 32) == 0) {
    m.state.fetch_add(m.count + (uint64_t(1) << 16), std::memory_order_release);
  }
}

// Performs a TMA box load (elements outside the tensor's dims land as zeros; box order is dim 0
// fastest; with a swizzle mode each 16-byte unit of the box's image goes to its address
// swizzled as wgmma_isa::smem_address reads it), the destination written and the source read
// in the performing thread's name for ThreadSanitizer, and completes its bytes on `m`.
EMU_UNCHECKED inline void perform(emu::Mbar& m, const emu::TmaCopy& copy) {
  const CUtensorMap& map = copy.map;
  const auto* base = static_cast<const unsigned char*>(map.base);
  const uint32_t dst = smem_addr(copy.dst), units = map.swizzle / 16;
  auto out = [&](int64_t n) {  // the image's element n
    uint32_t a = dst + static_cast<uint32_t>(2 * n);
    if (units > 1) a ^= ((a >> 7) & (units - 1)) << 4;
    return attention::smem + a;
  };
  int64_t n = 0;
  int64_t i[5];
  for (i[4] = 0; i[4] < map.box[4]; ++i[4]) {
    for (i[3] = 0; i[3] < map.box[3]; ++i[3]) {
      for (i[2] = 0; i[2] < map.box[2]; ++i[2]) {
        for (i[1] = 0; i[1] < map.box[1]; ++i[1]) {
          for (i[0] = 0; i[0] < map.box[0]; ++i[0]) {
            bool inside = true;
            int64_t offset = 0;
            for (int d = 0; d < 5; ++d) {
              const int64_t g = copy.c[d] + i[d];
              inside = inside && g >= 0 && g < static_cast<int64_t>(map.dims[d]);
              offset += g * (d == 0 ? 2 : static_cast<int64_t>(map.strides[d - 1]));
            }
            uint16_t v = 0;
            if (inside) {
              std::memcpy(&v, base + offset, 2);
              emu::tsan_access(base + offset, 2, false);
            }
            std::memcpy(out(n++), &v, 2);
          }
        }
      }
    }
  }
  emu::tsan_access(copy.dst, static_cast<size_t>(n) * 2, true);
  update(m, 0, -2 * n);
}

// Lands the copies issued on `m` so far (the non-TSan emulation: by the first thread that waits).
// A poll that finds none queued takes no lock: a copy queued after it is seen by the next poll,
// and the phase cannot complete before the copy's bytes are performed.
inline void land(emu::Mbar& m) {
  if (m.queued.load(std::memory_order_acquire) == 0) return;
  std::vector<emu::TmaCopy> copies;
  {
    std::lock_guard<std::mutex> guard(m.lock);
    copies.swap(m.copies);
    m.queued.store(0, std::memory_order_relaxed);
  }
  for (const emu::TmaCopy& copy : copies) perform(m, copy);
}
}  // namespace mbar_emu

inline void mbar_init(uint64_t* bar, int count) {
  const int i = emu::mbar_count++;
  if (i >= 16 || count < 1 || count > 0xFFFF) {
    ++emu::tma_faults;
    return;
  }
  emu::mbar_offsets[i] = smem_addr(bar);
  emu::mbars[i].count = static_cast<uint32_t>(count);
  emu::mbars[i].state.store(static_cast<uint64_t>(count), std::memory_order_relaxed);
}
inline void mbar_init_fence() {}
inline void mbar_arrive(uint64_t* bar) {
  if (emu::Mbar* m = mbar_emu::find(bar)) mbar_emu::update(*m, 1, 0);
}
inline void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  if (emu::Mbar* m = mbar_emu::find(bar)) mbar_emu::update(*m, 1, bytes);
}
inline void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  if (emu::Mbar* m = mbar_emu::find(bar)) mbar_emu::update(*m, 0, bytes);
}
// Returns once the phase of this parity has completed (the current phase's parity differs). A
// wait that lasts two minutes is a deadlock: the process stops rather than hang the tests.
inline void mbar_wait(uint64_t* bar, int parity) {
  emu::Mbar* m = mbar_emu::find(bar);
  if (m == nullptr) return;
  const auto start = std::chrono::steady_clock::now();
  for (int spins = 0;; ++spins) {
#if !defined(__SANITIZE_THREAD__)
    mbar_emu::land(*m);  // TMA copies issued on it land now, if not yet
#endif
    const uint64_t s = m->state.load(std::memory_order_acquire);
    if (((s >> 16) & 1) != static_cast<uint64_t>(parity & 1)) return;
    if (spins < 64) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
      if (std::chrono::steady_clock::now() - start > std::chrono::minutes(2)) {
        std::fprintf(stderr, "emulation: mbarrier wait (parity %d) deadlocked\n", parity);
        std::abort();
      }
    }
  }
}

// A TMA box load on mbarrier `bar`. As asynchronous as PTX allows: the box lands at some point
// between the issue and the wait that sees its bytes complete, so the emulation writes both
// ends of that window. Without ThreadSanitizer the destination holds NaN (0xFF) from the issue
// and the copy is performed by the first thread that waits on `bar`: a tile read before its
// wait reads NaN. Under ThreadSanitizer the copy is performed at issue as a fiber of its own,
// as the TMA unit would: ordered after what the issuing thread did before (its wait for the
// stage to be free), but the issuing thread is not ordered after the copy, so a later barrier
// the same thread arrives on does not cover it; only a wait on `bar` orders a reader after the
// copy, and a stage refilled while a wgmma still reads it (at the wgmma's wait) is a race.
// A swizzled box must start on its pattern's boundary (8 rows of the span), as the kernels'
// layouts (SwizzleLayout) assume. A box wholly outside the tensor is refused too: the PTX ISA
// fills a box's out-of-bound elements, but does not say what a box with none inside counts
// toward its mbarrier, so the kernels never issue one (tma_tile_bytes).
EMU_UNCHECKED inline void tma_load(void* dst, const CUtensorMap* map, uint64_t* bar, int c0,
                                   int c1, int c2, int c3, int c4) {
  if (smem_addr(dst) % std::max<uint32_t>(128, 8 * map->swizzle) != 0) ++emu::tma_faults;
  const int c[5] = {c0, c1, c2, c3, c4};
  for (int d = 0; d < 5; ++d) {
    const int64_t lo = c[d], hi = lo + static_cast<int64_t>(map->box[d]);
    if (lo >= static_cast<int64_t>(map->dims[d]) || hi <= 0) ++emu::tma_faults;
  }
  emu::Mbar* m = mbar_emu::find(bar);
  if (m == nullptr) return;
  const emu::TmaCopy copy{dst, *map, {c0, c1, c2, c3, c4}};
#if defined(__SANITIZE_THREAD__)
  void* issuer = __tsan_get_current_fiber();
  void* engine = __tsan_create_fiber(0);
  __tsan_switch_to_fiber(engine, 0);  // synchronising: the issuer's past happens before
  mbar_emu::perform(*m, copy);
  __tsan_switch_to_fiber(issuer, 1);  // __tsan_switch_to_fiber_no_sync
  __tsan_destroy_fiber(engine);
#else
  size_t bytes = 2;
  for (int d = 0; d < 5; ++d) bytes *= map->box[d];
  std::memset(dst, 0xFF, bytes);
  std::lock_guard<std::mutex> guard(m->lock);
  m->copies.push_back(copy);
  m->queued.fetch_add(1, std::memory_order_release);
#endif
}

inline void named_barrier_sync(int id, int threads) {
  if (::emu::Barrier* b = ::emu::named_barrier(id, threads)) b->arrive_and_wait(true);
}
inline void named_barrier_arrive(int id, int threads) {
  if (::emu::Barrier* b = ::emu::named_barrier(id, threads)) b->arrive();
}
inline void tma_prefetch_map(const CUtensorMap*) {}
template <int N> inline void setmaxnreg_dec() {}
template <int N> inline void setmaxnreg_inc() {}

inline void wgmma_commit() { emu::mmas.commit(); }
template <int N> inline void wgmma_wait() { emu::mmas.complete_all_but(N, wgmma_emu::wgmma_run); }
}  // namespace fastattn::cuda

namespace emu {
// cuTensorMapEncodeTiled's checks for a 16-bit tiled map without interleave, swizzled by
// `swizzle` bytes (0: none; CUDA driver API, "Tensor Map Object Management"), then the map: a
// launch logic that hands the driver arguments it rejects fails here too.
inline void encode_tensor_map(CUtensorMap* map, const void* base, const uint64_t (&dims)[5],
                              const uint64_t (&strides)[4], const uint32_t (&box)[5],
                              uint32_t swizzle) {
  // A null address (an empty tensor's) is refused too: the driver's documentation does not
  // promise to take one, so the launch logic must not ask.
  TORCH_CHECK(base != nullptr, "tensor map: null address");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(base) % 16 == 0,
              "tensor map: address not 16-byte aligned");
  for (int d = 0; d < 5; ++d) {
    TORCH_CHECK(dims[d] >= 1 && dims[d] <= (uint64_t(1) << 32), "tensor map: dim ", d, " is ",
                dims[d]);
    TORCH_CHECK(box[d] >= 1 && box[d] <= 256, "tensor map: box dim ", d, " is ", box[d]);
    if (d < 4) {
      TORCH_CHECK(strides[d] % 16 == 0 && strides[d] < (uint64_t(1) << 40),
                  "tensor map: stride ", d + 1, " is ", strides[d], " bytes");
    }
  }
  TORCH_CHECK(box[0] * 2 % 16 == 0, "tensor map: the inner box dim is not a multiple of 16 bytes");
  TORCH_CHECK(swizzle == 0 || swizzle == 32 || swizzle == 64 || swizzle == 128,
              "tensor map: swizzle of ", swizzle, " bytes");
  TORCH_CHECK(swizzle == 0 || box[0] * 2 <= swizzle, "tensor map: an inner box dim of ",
              box[0] * 2, " bytes is wider than the ", swizzle, "-byte swizzle");
  map->base = base;
  map->swizzle = swizzle;
  std::memcpy(map->dims, dims, sizeof(dims));
  std::memcpy(map->strides, strides, sizeof(strides));
  std::memcpy(map->box, box, sizeof(box));
}
}  // namespace emu
