// Tensor-core building blocks for sm_80 and newer, as inline PTX: mma.sync m16n8k16 (bf16 or
// fp16 in, fp32 accumulate), ldmatrix (plain and .trans), cp.async with zero fill, and packing
// of two floats into one 32-bit register of 16-bit values; for Hopper (sm_90a), the warpgroup
// MMA wgmma.mma_async m64nNk16 with its fences, mbarriers, TMA tensor loads and register
// reallocation (see the sections at the end).
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type").
// In a warp, lane = 4 * g + t (g = lane >> 2 the "group", t = lane & 3 the thread in group):
//
//   A (16 x 16, row-major), four .b32 registers of two 16-bit values each:
//     a[0] = A[g    ][2t, 2t+1]     a[1] = A[g + 8][2t, 2t+1]
//     a[2] = A[g    ][2t+8, 2t+9]   a[3] = A[g + 8][2t+8, 2t+9]
//   B (16 x 8, "col": indexed B[k][n]), two registers:
//     b[0] = B[2t, 2t+1][g]         b[1] = B[2t+8, 2t+9][g]
//   C, D (16 x 8, fp32), four registers:
//     c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g + 8][2t, 2t+1]
//   The lower column (or lower k) of each pair sits in the low 16 bits of its register.
//
//   ldmatrix.x4 loads four 8 x 8 matrices of 16-bit values; lanes 8m .. 8m + 7 give the
//   addresses of rows 0..7 of matrix m, each row 16 contiguous bytes (16-byte aligned). Lane
//   (g, t) receives in register m: matrix m's row g, columns 2t, 2t+1 (plain), or with .trans
//   matrix m's rows 2t, 2t+1 at column g (the matrix transposed on the way in).
//
// So, for a row-major tile X in shared memory (rows r, contiguous columns c):
//   - an A operand A = X[r0 + 0..15][c0 + 0..15]: ldmatrix.x4 with lane address
//     X[r0 + (lane % 16)][c0 + (lane / 16) * 8] gives a[0..3] in the order above
//     (matrices: rows 0-7 / 8-15 by lane bit 3, columns 0-7 / 8-15 by lane bit 4);
//   - B operands of two n-tiles with B[k][n] = X[n][k] (X holds the n index in its rows: K in
//     Q K^T): ldmatrix.x4 with lane address X[n0 + (lane % 8) + (lane / 16) * 8]
//     [k0 + ((lane / 8) % 2) * 8] gives {b[0], b[1]} of n-tile n0 in registers 0, 1 and of
//     n-tile n0 + 8 in registers 2, 3;
//   - B operands of two n-tiles with B[k][n] = X[k][n] (X holds the k index in its rows: V in
//     P V): ldmatrix.x4.trans with lane address X[k0 + (lane % 16)][n0 + (lane / 16) * 8]
//     gives the same register order.
//   - an fp32 accumulator C of a 16 x 16 product (two n-tiles c, c') becomes the A operand of
//     the next product with no data movement: a = {pack(c[0], c[1]), pack(c[2], c[3]),
//     pack(c'[0], c'[1]), pack(c'[2], c'[3])} (FlashAttention-2's register reuse of P).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda.h>  // CUtensorMap (the type only: nothing links the driver)
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace fastattn::cuda {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// D = A B + D for one m16n8k16 tile; T is __nv_bfloat16 or __half.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

// 16 bytes global -> shared, bypassing L1; `src_bytes` < 16 fills the rest with zeros (0: the
// source is not read, only a valid-looking address is passed).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)),
               "l"(gmem), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Two floats as one register of two 16-bit values, `lo` in the low half (round to nearest).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <typename T>
__device__ __forceinline__ float to_float(T x);

template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);

template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// --- Hopper (sm_90a): warpgroup MMA ------------------------------------------------------
//
// wgmma.mma_async.m64nNk16 (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"):
// the four warps of a warpgroup (128 threads) compute D (64 x N, fp32) += A (64 x 16) B (16 x N)
// together. Warp w of the group holds rows 16w .. 16w + 15 of D, and within a warp the
// accumulator (d[4 j + e]: row 16w + g + 8 (e / 2), column 8 j + 2t + e % 2) and a register A
// operand (four registers: rows g / g + 8, columns 2t, 2t + 1 / 2t + 8, 2t + 9) are laid out as
// mma.sync m16n8k16's C and A above, so S's accumulators become P's A operand as before.
//
// Operands in shared memory are read through a 64-bit descriptor (wgmma_layout.h), here always
// in the canonical layout without swizzling: 8 x 8 "core matrices" of 16-bit values, each eight
// 16-byte rows stored contiguously (128 bytes); the descriptor gives the start and two byte
// offsets between core matrices. K-major (imm-trans 0: A = Q, B = K, the reduction dim
// contiguous): LBO between core matrices along K, SBO between them along M / N. MN-major
// (imm-trans-b 1: B = V, N contiguous): LBO along K, SBO along N.
//
// Asynchrony: wgmma_fence() before the first wgmma that reads registers written by other
// instructions (the accumulators, a register A operand); wgmma_commit() closes a group;
// wgmma_wait<N>() waits until at most N groups are in flight, after which the accumulators may
// be read. Shared memory written by the threads themselves (cp.async included) is made
// visible to wgmma's async proxy by fence_proxy_async() in the writing thread, then a barrier.
// wgmma_fence_operands keeps the compiler from moving accumulator accesses across those.
//
// Built for anything but sm_90a, these trap: the launcher picks the Hopper kernels only where
// the sm_90a code is present (attention_cuda.cu).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FASTATTN_IF_SM90A(...) __VA_ARGS__
#else
#define FASTATTN_IF_SM90A(...) __trap();
#endif

__device__ __forceinline__ void wgmma_fence() {
  FASTATTN_IF_SM90A(asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");)
}

__device__ __forceinline__ void wgmma_commit() {
  FASTATTN_IF_SM90A(asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");)
}

template <int N>
__device__ __forceinline__ void wgmma_wait() {
  FASTATTN_IF_SM90A(asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");)
}

__device__ __forceinline__ void fence_proxy_async() {
  FASTATTN_IF_SM90A(asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");)
}

template <int N>
__device__ __forceinline__ void wgmma_fence_operands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// The same for accumulators kept as n-tiles of four (float[M][4], the mma.sync layout).
template <int M>
__device__ __forceinline__ void wgmma_fence_operands(float (&d)[M][4]) {
  wgmma_fence_operands(reinterpret_cast<float(&)[M * 4]>(d));
}

#define FASTATTN_F4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define FASTATTN_F16 FASTATTN_F4(0), FASTATTN_F4(4), FASTATTN_F4(8), FASTATTN_F4(12)
#define FASTATTN_F32 FASTATTN_F16, FASTATTN_F4(16), FASTATTN_F4(20), FASTATTN_F4(24), \
                     FASTATTN_F4(28)
#define FASTATTN_D16 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define FASTATTN_D32                                                                   \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, " \
  "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define FASTATTN_F64 FASTATTN_F32, FASTATTN_F4(32), FASTATTN_F4(36), FASTATTN_F4(40),           \
                     FASTATTN_F4(44), FASTATTN_F4(48), FASTATTN_F4(52), FASTATTN_F4(56),        \
                     FASTATTN_F4(60)
#define FASTATTN_D64                                                                        \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "  \
  "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "   \
  "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, "   \
  "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define FASTATTN_PRED(i) "{\n.reg .pred p;\nsetp.ne.b32 p, %" #i ", 0;\n"

// D (64 x N) = A B + (scale_d ? D : 0), A (64 x 16) and B (N x 16) both K-major in shared
// memory. N is 32, 64 or 128.
template <typename T, int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b,
                                         int scale_d) {
  static_assert(N == 32 || N == 64 || N == 128, "wgmma_ss: N is 32, 64 or 128");
  constexpr bool bf16 = std::is_same_v<T, __nv_bfloat16>;
#define FASTATTN_WGMMA_SS(n, TY, DL, FL, A, B, S)                                               \
  asm volatile(FASTATTN_PRED(S) "wgmma.mma_async.sync.aligned.m64n" #n "k16.f32." TY "." TY   \
               " " DL ", %" #A ", %" #B ", p, 1, 1, 0, 0;\n}\n"                                \
               : FL                                                                            \
               : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  if constexpr (N == 32 && bf16) {
    FASTATTN_IF_SM90A(FASTATTN_WGMMA_SS(32, "bf16", FASTATTN_D16, FASTATTN_F16, 16, 17, 18))
  } else if constexpr (N == 32) {
    FASTATTN_IF_SM90A(FASTATTN_WGMMA_SS(32, "f16", FASTATTN_D16, FASTATTN_F16, 16, 17, 18))
  } else if constexpr (N == 64 && bf16) {
    FASTATTN_IF_SM90A(FASTATTN_WGMMA_SS(64, "bf16", FASTATTN_D32, FASTATTN_F32, 32, 33, 34))
  } else if constexpr (N == 64) {
    FASTATTN_IF_SM90A(FASTATTN_WGMMA_SS(64, "f16", FASTATTN_D32, FASTATTN_F32, 32, 33, 34))
  } else if constexpr (bf16) {
    FASTATTN_IF_SM90A(FASTATTN_WGMMA_SS(128, "bf16", FASTATTN_D64, FASTATTN_F64, 64, 65, 66))
  } else {
    FASTATTN_IF_SM90A(FASTATTN_WGMMA_SS(128, "f16", FASTATTN_D64, FASTATTN_F64, 64, 65, 66))
  }
#undef FASTATTN_WGMMA_SS
}

// D (64 x N) = A B + (scale_d ? D : 0), A (64 x 16) in registers (the layout above), B (16 x N)
// MN-major in shared memory (imm-trans-b 1). N is 32 or 64.
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4],
                                         uint64_t desc_b, int scale_d) {
  static_assert(N == 32 || N == 64, "wgmma_rs: N is 32 or 64");
  constexpr bool bf16 = std::is_same_v<T, __nv_bfloat16>;
#define FASTATTN_WGMMA_RS(n, TY, DL, FL, A0, A1, A2, A3, B, S)                                  \
  asm volatile(FASTATTN_PRED(S) "wgmma.mma_async.sync.aligned.m64n" #n "k16.f32." TY "." TY   \
               " " DL ", {%" #A0 ", %" #A1 ", %" #A2 ", %" #A3 "}, %" #B ", p, 1, 1, 1;\n}\n"  \
               : FL                                                                            \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));
  if constexpr (N == 32 && bf16) {
    FASTATTN_IF_SM90A(FASTATTN_WGMMA_RS(32, "bf16", FASTATTN_D16, FASTATTN_F16, 16, 17, 18, 19,
                                        20, 21))
  } else if constexpr (N == 32) {
    FASTATTN_IF_SM90A(FASTATTN_WGMMA_RS(32, "f16", FASTATTN_D16, FASTATTN_F16, 16, 17, 18, 19,
                                        20, 21))
  } else if constexpr (bf16) {
    FASTATTN_IF_SM90A(FASTATTN_WGMMA_RS(64, "bf16", FASTATTN_D32, FASTATTN_F32, 32, 33, 34, 35,
                                        36, 37))
  } else {
    FASTATTN_IF_SM90A(FASTATTN_WGMMA_RS(64, "f16", FASTATTN_D32, FASTATTN_F32, 32, 33, 34, 35,
                                        36, 37))
  }
#undef FASTATTN_WGMMA_RS
}

// --- Hopper (sm_90a): mbarriers and TMA ---------------------------------------------------
//
// An mbarrier (PTX ISA, "Parallel Synchronization and Communication Instructions: mbarrier") is
// a 64-bit object in shared memory that completes a phase when its pending arrivals reach zero
// and every byte a transaction announced (expect-tx) has landed (complete-tx, done by TMA);
// mbar_wait(bar, parity) returns once the phase of that parity has completed (a fresh barrier
// is in phase 0, so waiting for parity 1 passes at once: a producer's first wait on an empty
// ring). tma_load copies a box of a tensor map (cp.async.bulk.tensor, "tiled" mode) into shared
// memory and completes its bytes on the barrier; out-of-bound elements land as zeros. The
// tensor map is a kernel parameter (__grid_constant__), its address generic.

__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  FASTATTN_IF_SM90A(asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(
                                     smem_addr(bar)),
                                 "r"(count)
                                 : "memory");)
}

// Makes initialised mbarriers visible to the async proxy (TMA); a barrier follows.
__device__ __forceinline__ void mbar_init_fence() {
  FASTATTN_IF_SM90A(asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");)
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  FASTATTN_IF_SM90A(asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(
                                     smem_addr(bar))
                                 : "memory");)
}

// One arrival that also announces `bytes` of transactions (the TMA copies of this phase).
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  FASTATTN_IF_SM90A(asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(
                                     smem_addr(bar)),
                                 "r"(bytes)
                                 : "memory");)
}

// Announces `bytes` of transactions on the barrier's current phase without arriving: the
// copies can be issued before the arrival that completes the phase (mbar_arrive) is due.
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  FASTATTN_IF_SM90A(asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(
                                     smem_addr(bar)),
                                 "r"(bytes)
                                 : "memory");)
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, int parity) {
  FASTATTN_IF_SM90A(asm volatile("{\n.reg .pred done;\nLAB_WAIT:\n"
                                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                                 "@!done bra LAB_WAIT;\n}\n" ::"r"(smem_addr(bar)),
                                 "r"(parity)
                                 : "memory");)
}

// Fetches a tensor map into the TMA unit's cache ahead of its first load.
__device__ __forceinline__ void tma_prefetch_map(const CUtensorMap* map) {
  FASTATTN_IF_SM90A(asm volatile("prefetch.tensormap [%0];\n" ::"l"(
                                     reinterpret_cast<uint64_t>(map))
                                 : "memory");)
}

// The box at coordinates (c0 .. c4) of the 5-d tensor map `map` into `dst` (128-byte aligned),
// its bytes completed on `bar`.
__device__ __forceinline__ void tma_load(void* dst, const CUtensorMap* map, uint64_t* bar, int c0,
                                         int c1, int c2, int c3, int c4) {
  FASTATTN_IF_SM90A(asm volatile(
      "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5, %6}], [%7];\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4),
      "r"(smem_addr(bar))
      : "memory");)
}

// The registers a thread of this warpgroup may hold from here on (every thread of the warpgroup
// executes it): a producer warpgroup gives registers back, the consumers take them.
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  FASTATTN_IF_SM90A(asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));)
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  FASTATTN_IF_SM90A(asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));)
}

// bar.sync on named barrier `id` (1..15; 0 is __syncthreads) of `threads` threads (a multiple
// of 32): a barrier for part of a CTA, here the consumer warpgroups without the producer warp.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// bar.arrive on named barrier `id` of `threads` threads: counts this warp toward the phase that
// other warps wait for with named_barrier_sync, without waiting for it.
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

#undef FASTATTN_PRED
#undef FASTATTN_D64
#undef FASTATTN_D32
#undef FASTATTN_D16
#undef FASTATTN_F64
#undef FASTATTN_F32
#undef FASTATTN_F16
#undef FASTATTN_F4
#undef FASTATTN_IF_SM90A

}  // namespace fastattn::cuda
