// The layouts of wgmma.mma_async m64nNk16 (16-bit A and B, fp32 D) as the CUDA
// emulation reads them from the PTX ISA ("Asynchronous Warpgroup Level Matrix Multiply-
// Accumulate": register fragments, "Shared Memory Matrix Layout", "Matrix Descriptor Format").
// emulation.h computes every emulated wgmma through these functions, and cute_check.cu holds
// each against CuTe's description of the same instruction (CLayout_64xN, ALayout_64x16,
// make_gmma_desc), so that the emulation cannot pass a kernel that shares a misreading of the
// ISA with it. Plain C++: compiled by the emulation's host compiler and by nvcc.
#pragma once

#include <cstdint>

namespace wgmma_isa {

struct Coord {
  int row, col;
};

// Accumulator d[i] (i < N / 2) of thread `thread` of the warpgroup (0..127; warp w = thread /
// 32, lane = 4 g + t): row 16 w + g + 8 (i % 4 / 2) of D, column 8 (i / 4) + 2 t + i % 2.
constexpr Coord accumulator(int thread, int i) {
  const int w = thread / 32, g = thread % 32 / 4, t = thread % 4;
  return {16 * w + g + 8 * (i % 4 / 2), 8 * (i / 4) + 2 * t + i % 2};
}

// The 16-bit value v (0..7) of a register A operand of thread `thread`, held in register v / 2
// (its low half when v is even): row 16 w + g + 8 (v / 2 % 2) of A, column (k) 2 t + v % 2 +
// 8 (v / 4).
constexpr Coord a_register(int thread, int v) {
  const int w = thread / 32, g = thread % 32 / 4, t = thread % 4;
  return {16 * w + g + 8 * (v / 2 % 2), 2 * t + v % 2 + 8 * (v / 4)};
}

// A shared-memory matrix descriptor's fields, in bytes.
struct Descriptor {
  uint32_t start, lbo, sbo, base_offset, swizzle;
};

// Bits 0-13 start address, 16-29 leading byte offset, 32-45 stride byte offset (each stored
// >> 4), 49-51 base offset, 62-63 swizzle mode (0: none, 1: 128 bytes, 2: 64, 3: 32).
constexpr Descriptor decode(uint64_t desc) {
  return {static_cast<uint32_t>(desc & 0x3FFF) << 4,
          static_cast<uint32_t>((desc >> 16) & 0x3FFF) << 4,
          static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4,
          static_cast<uint32_t>((desc >> 49) & 7), static_cast<uint32_t>(desc >> 62)};
}

// Byte offset from the descriptor's start of element (mn, k) of a 16-bit operand (mn the row
// of A or the column of B) in the canonical layouts without swizzling, T = 8 values (16
// bytes): K-major ((8,m),(T,2k)):((1T,SBO),(1,LBO)), MN-major ((T,1,m),(8,k)):((1,T,SBO),
// (1T,LBO)); that is, 8 x 8 core matrices of 128 contiguous bytes, LBO apart along K and SBO
// apart along M / N.
constexpr uint32_t smem_offset(const Descriptor& d, int mn, int k, bool mn_major) {
  const uint32_t in_core = mn_major ? (mn % 8) * 2 + (k % 8) * 16 : (k % 8) * 2 + (mn % 8) * 16;
  return in_core + (mn / 8) * d.sbo + (k / 8) * d.lbo;
}

// The shared-memory byte address of element (mn, k), any swizzle mode. Swizzled, with a span of
// W bytes (U = W / 16 units of T = 8 values) the canonical layouts are K-major
// ((8,m),(T,2k)):((W,SBO),(2,16)) and MN-major ((T,U,n),(8,k)):((2,16,LBO),(W,SBO)) in bytes
// (LBO unused K-major), and the address they give has its bits 4 up XORed with its bits 7 up
// (U - 1 of them: the 16-byte unit within the row by the row within its group of eight).
constexpr uint32_t smem_address(const Descriptor& d, int mn, int k, bool mn_major) {
  if (d.swizzle == 0) return d.start + smem_offset(d, mn, k, mn_major);
  const uint32_t span = 256u >> d.swizzle, units = span / 16;
  const uint32_t offset =
      mn_major ? (mn % 8) * 2 + (mn / 8 % units) * 16 + (mn / 8 / units) * d.lbo +
                     (k % 8) * span + (k / 8) * d.sbo
               : (mn % 8) * span + (mn / 8) * d.sbo + k * 2;
  const uint32_t addr = d.start + offset;
  return addr ^ (((addr >> 7) & (units - 1)) << 4);
}

}  // namespace wgmma_isa
