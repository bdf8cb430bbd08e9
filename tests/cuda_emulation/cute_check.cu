// Holds the Hopper attention forward's wgmma operands (csrc/common/wgmma_layout.h) and the CUDA
// emulation's reading of the PTX ISA (wgmma_isa.h) against CuTe, NVIDIA's own description of
// the same instructions (the nvidia-cutlass wheel's headers):
//   - the accumulator and register-A fragments of wgmma m64nNk16 (wgmma_isa::accumulator,
//     a_register) against CuTe's CLayout_64xN and ALayout_64x16;
//   - every operand slab the kernels hand to wgmma (Q and K K-major, V MN-major; head dims 32
//     to 256, 32 or 64 rows or columns per instruction, every k-step): the tile layouts as
//     CuTe layouts (core_offset against CuTe's no-swizzle core matrices; the TMA kernels'
//     SwizzleLayout against tile_to_shape of CuTe's swizzled GMMA atoms, the layouts NVIDIA's
//     own Hopper kernels load by TMA), CuTe's make_gmma_desc of each slab against the
//     kernel's strides, swizzle mode (CoreLayout, SwizzleLayout) and descriptor bits
//     (wgmma_desc_bits), and the emulation's address of every element (wgmma_isa::smem_address
//     of the decoded descriptor) against CuTe's.
// The emulation computes the kernel's wgmma with these functions, so it cannot share a misreading
// of the ISA with the kernel unnoticed. Host code only, run on the CPU (no GPU needed): built
// and run by tests/test_cuda_emulation.py with nvcc. Prints each mismatch (up to 20) and a
// count; exits 1 on any mismatch. On the host CuTe cannot convert a shared-memory pointer and
// prints "ERROR: cast_smem_ptr_to_uint not supported but used." for each descriptor: its start
// address field is then 0, and the slab's start is checked as an element offset instead.
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include <cstdint>
#include <cstdio>
#include <type_traits>

#include "common/wgmma_layout.h"
#include "wgmma_isa.h"

using namespace cute;
namespace fc = fastattn::cuda;
namespace gmma = cute::SM90::GMMA;

namespace {

int checks = 0, failures = 0;

template <typename... Args>
void expect(bool ok, const char* fmt, Args... args) {
  ++checks;
  if (ok) return;
  if (++failures <= 20) {
    std::printf("MISMATCH: ");
    std::printf(fmt, args...);
    std::printf("\n");
  }
}

// D (64 x N) of m64nNk16: thread, value -> (m, n), as index m + 64 n.
template <int N>
void check_accumulators() {
  constexpr auto layout = gmma::CLayout_64xN<N>{};
  static_assert(size<1>(layout) == N / 2, "N / 2 accumulators per thread");
  for (int thread = 0; thread < 128; ++thread) {
    for (int i = 0; i < N / 2; ++i) {
      const int idx = layout(thread, i);
      const wgmma_isa::Coord c = wgmma_isa::accumulator(thread, i);
      expect(c.row == idx % 64 && c.col == idx / 64,
             "m64n%dk16 accumulator %d of thread %d: CuTe (%d, %d), wgmma_isa (%d, %d)", N, i,
             thread, idx % 64, idx / 64, c.row, c.col);
    }
  }
}

// A (64 x 16) from registers: thread, value -> (m, k), as index m + 64 k; value v is the low
// (v even) or high half of register v / 2 (CuTe packs a fragment's 16-bit values in order).
void check_a_registers() {
  constexpr auto layout = gmma::ALayout_64x16{};
  static_assert(size<1>(layout) == 8, "eight 16-bit values per thread");
  for (int thread = 0; thread < 128; ++thread) {
    for (int v = 0; v < 8; ++v) {
      const int idx = layout(thread, v);
      const wgmma_isa::Coord c = wgmma_isa::a_register(thread, v);
      expect(c.row == idx % 64 && c.col == idx / 64,
             "register A value %d of thread %d: CuTe (%d, %d), wgmma_isa (%d, %d)", v, thread,
             idx % 64, idx / 64, c.row, c.col);
    }
  }
}

// A kernel's ROWS x kD tile as a CuTe layout, (row, column) -> element: core_offset's
// (CoreLayout: core matrices row-major) or, kSwizzled, the K-major swizzled GMMA atom of the
// TMA kernels' span tiled over the tile, rows first (SwizzleLayout).
template <int kD, int ROWS, bool kSwizzled>
constexpr auto tile_layout() {
  if constexpr (kSwizzled) {
    constexpr int span = fc::kSwizzleSpan<kD>;
    using Atom = std::conditional_t<
        span == 128, gmma::Layout_K_SW128_Atom<half_t>,
        std::conditional_t<span == 64, gmma::Layout_K_SW64_Atom<half_t>,
                           gmma::Layout_K_SW32_Atom<half_t>>>;
    return tile_to_shape(Atom{}, Shape<Int<ROWS>, Int<kD>>{});
  } else {
    return make_layout(
        make_shape(make_shape(_8{}, Int<ROWS / 8>{}), make_shape(_8{}, Int<kD / 8>{})),
        make_stride(make_stride(_8{}, Int<8 * kD>{}), make_stride(_1{}, _64{})));
  }
}

// One operand slab (mn x k view of shared memory, k = 16) handed to wgmma with the kernel's
// strides and start element `start` of its tile.
template <gmma::Major kMajor, typename Slab>
void check_slab(const Slab& slab, const half_t* tile, int start, fc::CoreStrides strides,
                const char* what, int kD, int n, int step) {
  const bool mn_major = kMajor == gmma::Major::MN;
  const GmmaDescriptor desc = gmma::make_gmma_desc<kMajor>(slab);
  // Element addresses through references: a swizzled tensor's iterator applies the swizzle.
  auto element = [&](int mn, int k) {
    return static_cast<int>(&static_cast<const half_t&>(slab(mn, k)) - tile);
  };
  const int slab_start = element(0, 0);
  expect(slab_start == start, "%s kD %d n %d step %d: slab starts at element %d, kernel's %d",
         what, kD, n, step, slab_start, start);
  wgmma_isa::Descriptor cute = wgmma_isa::decode(desc.desc_);
  // An MN-major swizzled slab no wider than one swizzle block never steps by its LBO: CuTe
  // then writes 0 there, the kernel its column blocks' stride. Its element addresses below
  // are checked through the kernel's descriptor as well as CuTe's.
  const bool lbo_read = !(mn_major && strides.swizzle != 0 &&
                          2 * static_cast<int>(size<0>(slab)) <= (256 >> strides.swizzle));
  const fc::CoreStrides as_read{lbo_read ? strides.lbo : cute.lbo, strides.sbo, strides.swizzle};
  expect(cute.lbo == as_read.lbo && cute.sbo == strides.sbo && cute.swizzle == strides.swizzle &&
             cute.base_offset == 0,
         "%s kD %d n %d step %d: CuTe's descriptor has LBO %u SBO %u swizzle %u base %u, the "
         "kernel's LBO %u SBO %u swizzle %u", what, kD, n, step, cute.lbo, cute.sbo,
         cute.swizzle, cute.base_offset, strides.lbo, strides.sbo, strides.swizzle);
  expect(fc::wgmma_desc_bits(0, as_read) == desc.desc_,
         "%s kD %d n %d step %d: CuTe's descriptor bits %016llx, wgmma_desc_bits %016llx", what,
         kD, n, step, static_cast<unsigned long long>(desc.desc_),
         static_cast<unsigned long long>(fc::wgmma_desc_bits(0, as_read)));
  // The tile starts on a 1024-byte boundary, so its offsets have an address's swizzle bits.
  cute.start = 2 * static_cast<uint32_t>(start);
  const wgmma_isa::Descriptor kernel =
      wgmma_isa::decode(fc::wgmma_desc_bits(2 * static_cast<uint32_t>(start), strides));
  for (int mn = 0; mn < size<0>(slab); ++mn) {
    for (int k = 0; k < 16; ++k) {
      const int cute_bytes = 2 * element(mn, k);
      const int emu_bytes = static_cast<int>(wgmma_isa::smem_address(cute, mn, k, mn_major));
      const int kernel_bytes = static_cast<int>(wgmma_isa::smem_address(kernel, mn, k, mn_major));
      expect(cute_bytes == emu_bytes && cute_bytes == kernel_bytes,
             "%s kD %d n %d step %d: element (%d, %d) at byte %d for CuTe, %d for wgmma_isa "
             "(%d through the kernel's descriptor)", what, kD, n, step, mn, k, cute_bytes,
             emu_bytes, kernel_bytes);
    }
  }
}

// Q or K (ROWS x kD) as a K-major operand of S = Q K^T, at every k-step of 16 columns; then
// V (ROWS keys x kD) as the MN-major B operand of O += P V: NC columns by 16 keys at a time.
// Layout: the kernels' CoreLayout<kD> or SwizzleLayout<ROWS, kD> (wgmma_layout.h).
template <int kD, int ROWS, int NC, bool kSwizzled>
void check_tiles() {
  using Kernel = std::conditional_t<kSwizzled, fc::SwizzleLayout<ROWS, kD>, fc::CoreLayout<kD>>;
  const char* name = kSwizzled ? "swizzled" : "core";
  alignas(1024) static half_t tile[ROWS * kD];
  constexpr auto layout = tile_layout<kD, ROWS, kSwizzled>();
  const auto qk = make_tensor(make_smem_ptr(static_cast<const half_t*>(tile)), layout);
  // Through the tensor: a swizzled layout's swizzle acts on the address (smem_ptr_flag).
  for (int r = 0; r < ROWS; ++r) {
    for (int c = 0; c < kD; ++c) {
      const int at = static_cast<int>(&static_cast<const half_t&>(qk(r, c)) - tile);
      expect(at == Kernel::offset(r, c),
             "%s kD %d: tile element (%d, %d) is %d in the CuTe layout, %d by the kernel's", name,
             kD, r, c, at, Kernel::offset(r, c));
    }
  }
  for (int ks = 0; ks < kD / 16; ++ks) {
    const auto slab = local_tile(qk, Shape<Int<ROWS>, _16>{}, make_coord(0, ks));
    check_slab<gmma::Major::K>(slab, tile, Kernel::offset(0, ks * 16), Kernel::k_major,
                               kSwizzled ? "K-major Q/K (swizzled)" : "K-major Q/K", kD, ROWS,
                               ks);
  }
  // B(n, k) = V[k][n]: the tile's two modes swapped (a swizzled layout's under its swizzle).
  auto swapped = [](auto l) {
    if constexpr (kSwizzled) {
      return make_composed_layout(l.layout_a(), l.offset(), select<1, 0>(l.layout_b()));
    } else {
      return select<1, 0>(l);
    }
  };
  const auto v = make_tensor(make_smem_ptr(static_cast<const half_t*>(tile)), swapped(layout));
  for (int c = 0; c < kD / NC; ++c) {
    for (int kk = 0; kk < ROWS / 16; ++kk) {
      const auto slab = local_tile(v, Shape<Int<NC>, _16>{}, make_coord(c, kk));
      check_slab<gmma::Major::MN>(slab, tile, Kernel::offset(kk * 16, c * NC), Kernel::mn_major,
                                  kSwizzled ? "MN-major V (swizzled)" : "MN-major V", kD, NC,
                                  c * 100 + kk);
    }
  }
}

// The TMA forward's and dQ's Q tile: 128 rows, of which the second warpgroup's operand starts
// at row 64 with the whole tile's strides.
template <int kD>
void check_swizzled_q_rows() {
  using Q = fc::SwizzleLayout<128, kD>;
  alignas(1024) static half_t tile[128 * kD];
  constexpr auto layout = tile_layout<kD, 128, true>();
  const auto q = make_tensor(make_smem_ptr(static_cast<const half_t*>(tile)), layout);
  for (int ks = 0; ks < kD / 16; ++ks) {
    const auto slab = local_tile(q, Shape<_64, _16>{}, make_coord(1, ks));
    check_slab<gmma::Major::K>(slab, tile, Q::offset(64, ks * 16), Q::k_major,
                               "K-major Q rows 64-127 (swizzled)", kD, 64, ks);
  }
}

template <int kD>
void check_head_dim() {
  check_tiles<kD, 32, 32, false>();
  check_tiles<kD, 64, 32, false>();
  if constexpr (kD % 64 == 0) {
    check_tiles<kD, 32, 64, false>();
    check_tiles<kD, 64, 64, false>();
  }
  if constexpr (kD >= 96) {
    // The TMA kernels' tiles: K / V of 64 and 32 rows (the forward's and dQ's stages above
    // head dim 128), Q / dO of 64 and 32 rows (dK/dV's stages), 128 (the forward's and dQ's).
    constexpr int NC = kD % 64 == 0 ? 64 : 32;
    check_tiles<kD, 32, NC, true>();
    check_tiles<kD, 64, NC, true>();
    check_tiles<kD, 128, NC, true>();
    check_swizzled_q_rows<kD>();
  }
}

}  // namespace

int main() {
  check_accumulators<32>();
  check_accumulators<64>();
  check_a_registers();
  check_head_dim<32>();
  check_head_dim<64>();
  check_head_dim<96>();
  check_head_dim<128>();
  check_head_dim<192>();
  check_head_dim<256>();
  std::printf("%d checks, %d mismatches\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
