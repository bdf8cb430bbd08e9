// Tensor-core building blocks for sm_80 and newer, as inline PTX: mma.sync m16n8k16 (bf16 or
// fp16 in, fp32 accumulate), ldmatrix (plain and .trans), cp.async with zero fill, and packing
// of two floats into one 32-bit register of 16-bit values.
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
#include <cuda_runtime.h>

#include <cstdint>

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

}  // namespace fastattn::cuda
