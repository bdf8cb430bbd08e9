// Where the Hopper attention forward keeps its wgmma operands in shared memory, in plain C++
// (host and device, FASTATTN_HOST_DEVICE): the no-swizzle core-matrix layout of a tile, the
// byte offsets its descriptors carry, and the descriptor's bit encoding. Plain arithmetic, so
// that tests/cuda_emulation/cute_check.cu can hold all three against CuTe's make_gmma_desc
// (the layouts NVIDIA's own Hopper kernels hand to wgmma) on a machine without a GPU.
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

// A descriptor's two byte offsets between core matrices (PTX ISA, "Shared Memory Matrix
// Layout"): K-major, LBO along K and SBO along M / N; MN-major, LBO along K and SBO along N.
struct CoreStrides {
  uint32_t lbo, sbo;
};

// Such a tile as a K-major operand (rows = M or N, columns = K: Q and K in S = Q K^T): core
// matrices 128 bytes apart along K, 16 kD bytes (8 rows) apart along the rows.
template <int kD>
constexpr CoreStrides kKMajorTile{128, 16 * kD};

// Such a tile as an MN-major operand (rows = K, columns = N: V in O = P V): 16 kD bytes apart
// along K (8 rows), 128 bytes apart along N.
template <int kD>
constexpr CoreStrides kMNMajorTile{16 * kD, 128};

// The same core matrices with the column blocks outermost, ROWS rows each: element (r, c) of a
// ROWS x kD tile at ((c / 8) ROWS + r) 8 + c % 8. This is what one TMA box of {8 columns, ROWS
// rows, kD / 8 column blocks} writes (the Hopper forward with TMA: attention_cuda.cuh), a row
// range then being a box coordinate with its own bound, so rows past the end land as zeros.
template <int ROWS>
FASTATTN_HOST_DEVICE constexpr int slab_offset(int r, int c) {
  return ((c / 8) * ROWS + r) * 8 + c % 8;
}

// A tile layout as the Hopper kernels use it: where element (r, c) lies, and the core-matrix
// strides of the tile as a K-major operand (rows = M or N) and as an MN-major one (rows = K).
template <int kD>
struct CoreLayout {
  static FASTATTN_HOST_DEVICE constexpr int offset(int r, int c) { return core_offset<kD>(r, c); }
  static constexpr CoreStrides k_major = kKMajorTile<kD>, mn_major = kMNMajorTile<kD>;
};
// slab_offset's: core matrices 16 ROWS bytes apart along the columns, 128 along the rows.
template <int ROWS>
struct SlabLayout {
  static FASTATTN_HOST_DEVICE constexpr int offset(int r, int c) { return slab_offset<ROWS>(r, c); }
  static constexpr CoreStrides k_major{16 * ROWS, 128}, mn_major{128, 16 * ROWS};
};

// The 64-bit wgmma descriptor without swizzling of an operand at shared-memory byte address
// `addr` (PTX ISA, "Matrix Descriptor Format"): bits 0-13 the start address, 16-29 the LBO,
// 32-45 the SBO, each as (x & 0x3FFFF) >> 4; the base offset (bits 49-51) and the swizzle mode
// (bits 62-63) stay 0.
FASTATTN_HOST_DEVICE constexpr uint64_t wgmma_desc_bits(uint32_t addr, CoreStrides s) {
  auto enc = [](uint32_t x) { return static_cast<uint64_t>((x & 0x3FFFF) >> 4); };
  return enc(addr) | enc(s.lbo) << 16 | enc(s.sbo) << 32;
}

}  // namespace fastattn::cuda
