// Where the Hopper attention kernels keep their wgmma operands in shared memory, in plain C++
// (host and device, FASTATTN_HOST_DEVICE): the no-swizzle core-matrix layout of the cp.async
// kernels' tiles, the swizzled layout of the TMA kernels' tiles, the byte offsets and swizzle
// mode their descriptors carry, and the descriptor's bit encoding. Plain arithmetic, so that
// tests/cuda_emulation/cute_check.cu can hold all of it against CuTe (tile_to_shape of its
// GMMA layout atoms, make_gmma_desc: the layouts NVIDIA's own Hopper kernels hand to wgmma) on
// a machine without a GPU.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace fastattn::cuda {

// Element (r, c) of a ROWS x kD tile of 16-bit values, in elements from the tile's start:
// 8 x 8 core matrices of 128 contiguous bytes (eight 16-byte rows), row-major over
// (r / 8, c / 8). ROWS is a multiple of 8 and kD of 16.
template <int kD>
FASTATTN_HOST_DEVICE constexpr int core_offset(int r, int c) {
  return ((r / 8) * (kD / 8) + c / 8) * 64 + (r % 8) * 8 + c % 8;
}

// A descriptor's two byte offsets and its swizzle mode (PTX ISA, "Shared Memory Matrix
// Layout"). Without swizzling: K-major, LBO along K and SBO along M / N between core matrices;
// MN-major, LBO along K and SBO along N. Swizzled (SwizzleLayout): K-major, SBO between groups
// of 8 rows along M / N (LBO unused: 1, as CuTe sets it); MN-major, LBO between swizzle-wide
// column blocks along N and SBO between groups of 8 rows along K. `swizzle` is the mode as the
// descriptor's bits 62-63 hold it (swizzle_mode).
struct CoreStrides {
  uint32_t lbo, sbo;
  uint32_t swizzle = 0;
};

// Such a tile as a K-major operand (rows = M or N, columns = K: Q and K in S = Q K^T): core
// matrices 128 bytes apart along K, 16 kD bytes (8 rows) apart along the rows.
template <int kD>
constexpr CoreStrides kKMajorTile{128, 16 * kD};

// Such a tile as an MN-major operand (rows = K, columns = N: V in O = P V): 16 kD bytes apart
// along K (8 rows), 128 bytes apart along N.
template <int kD>
constexpr CoreStrides kMNMajorTile{16 * kD, 128};

// The swizzle of rows `span` bytes wide (32, 64 or 128; PTX ISA and CUDA's TMA, "swizzle
// modes"): the 16-byte unit of byte address `addr` within its span (address bits 4 up, log2
// of span / 16 of them) is XORed with as many bits from bit 7 up, the 128-byte line's index.
// The pattern repeats every 8 x span bytes of address (1024 at 128), so a tile starting on
// such a boundary has it in tile offsets as well.
FASTATTN_HOST_DEVICE constexpr uint32_t swizzle_bytes(uint32_t addr, int span) {
  return addr ^ (((addr >> 7) & static_cast<uint32_t>(span / 16 - 1)) << 4);
}
// The descriptor's (and the layout's) mode for a swizzle span: 1 = 128 bytes, 2 = 64, 3 = 32.
FASTATTN_HOST_DEVICE constexpr uint32_t swizzle_mode(int span) {
  return span == 128 ? 1 : span == 64 ? 2 : 3;
}
// The widest swizzle span that splits a row of kD 16-bit values evenly: 128 bytes (64 columns)
// at head dims 64, 128, 192, 256; 64 (32 columns) at 96; 32 at the rest.
template <int kD>
constexpr int kSwizzleSpan = kD % 64 == 0 ? 128 : kD % 32 == 0 ? 64 : 32;

// A tile layout as the Hopper kernels use it: where element (r, c) lies, and the core-matrix
// strides of the tile as a K-major operand (rows = M or N) and as an MN-major one (rows = K).
template <int kD>
struct CoreLayout {
  static FASTATTN_HOST_DEVICE constexpr int offset(int r, int c) { return core_offset<kD>(r, c); }
  static constexpr CoreStrides k_major = kKMajorTile<kD>, mn_major = kMNMajorTile<kD>;
};
// The TMA kernels' ROWS x kD tile (attention_cuda.cuh: fwd_tma, dq_tma, dkdv_tma), as wgmma's
// swizzled layouts and the TMA's swizzle modes agree on it (CuTe: tile_to_shape of
// GMMA::Layout_K_SW128_Atom, or the SW64 / SW32 atom): column blocks of kCols = span / 2
// columns outermost, each ROWS rows of `span` bytes, the 16-byte units of each row swizzled
// (swizzle_bytes). One TMA box of {kCols columns, ROWS rows} with the same swizzle mode writes
// a column block, so each is a load of its own, with the global tensor's own bounds on rows
// and columns (zeros past them). The tile starts on a 1024-byte boundary. As a K-major operand
// (rows = M or N) a k-step of 16 columns is 32 bytes of a row; as an MN-major one (rows = K),
// N within one column block (the kernels' chunks of C are kCols wide, wgmma_pb). At a row that
// is a multiple of 8 the swizzle is the identity, so offset() there is also the unswizzled
// start address a descriptor takes.
template <int ROWS, int kD>
struct SwizzleLayout {
  static constexpr int kSpan = kSwizzleSpan<kD>, kCols = kSpan / 2;
  static_assert(ROWS % 8 == 0 && kD % kCols == 0, "whole swizzle atoms");
  static FASTATTN_HOST_DEVICE constexpr int offset(int r, int c) {
    const int bytes = ((c / kCols) * ROWS + r) * kSpan + (c % kCols) * 2;
    return static_cast<int>(swizzle_bytes(static_cast<uint32_t>(bytes), kSpan) / 2);
  }
  static constexpr CoreStrides k_major{16, 8 * kSpan, swizzle_mode(kSpan)},
      mn_major{ROWS * kSpan, 8 * kSpan, swizzle_mode(kSpan)};
};

// The 64-bit wgmma descriptor of an operand at shared-memory byte address `addr` (PTX ISA,
// "Matrix Descriptor Format"): bits 0-13 the start address, 16-29 the LBO, 32-45 the SBO, each
// as (x & 0x3FFFF) >> 4, bits 62-63 the swizzle mode; the base offset (bits 49-51) stays 0 (a
// swizzled tile starts on its pattern's boundary).
FASTATTN_HOST_DEVICE constexpr uint64_t wgmma_desc_bits(uint32_t addr, CoreStrides s) {
  auto enc = [](uint32_t x) { return static_cast<uint64_t>((x & 0x3FFFF) >> 4); };
  return enc(addr) | enc(s.lbo) << 16 | enc(s.sbo) << 32 | static_cast<uint64_t>(s.swizzle) << 62;
}

}  // namespace fastattn::cuda
