// Fused attention on CUDA (FlashAttention-2 style, tensor cores through mma.sync; on Hopper the
// forward through wgmma), forward and backward: the kernels and the launch logic of
// fastattn::native_attention_fwd / native_attention_bwd for CUDA tensors (attention_cuda.cu
// registers the ops, attention_cuda_launcher.cuh launches the kernels, attention_cuda_d<kD>.cu
// compiles each head dim's; the CPU kernels are attention_cpu.cpp). Written for sm_80 and newer;
// compiled for sm_80 and sm_90a.
//
// What it computes, per batch b and query head h (key/value head hk = h / (Hq / Hk), GQA by
// index, K/V never repeated), as fastattn.reference.attention_fwd / attention_bwd and the CPU
// and Triton kernels:
//
//     s_ij = softcap * tanh(scale * q_i.k_j / softcap)     (scale * q_i.k_j without softcap)
//            + mask_ij                                     (additive mask; -inf masks)
//     s_ij = -inf  where a bool mask is False or key j lies outside query i's window
//     p_ij = exp(s_ij - lse_i),  lse_i = log sum_j exp(s_ij)  (-inf: the row sees no key)
//     o_i  = sum_j p_ij z_ij / (1 - dropout_p) v_j            (z: the dropout keep mask)
//
//     backward, P the dropped-and-rescaled probabilities, delta_i = sum_d do_id o_id:
//     dv_j = sum_i P_ij do_i,  dP_ij = do_i.v_j z_ij / (1 - dropout_p),
//     ds_ij = p_ij (dP_ij - delta_i)  (the additive mask's gradient, written when asked),
//     dq_i = scale sum_j ds'_ij k_j,  dk_j = scale sum_i ds'_ij q_i,  ds' = ds (1 - tanh^2)
//     under softcap, ds otherwise.
//
// The window is i + offset - left <= j <= i + offset + right (offset 0 or S - L, -1 leaves a
// side unbounded; causal is right = 0). A row that sees no key gives output 0, lse -inf and
// zero gradients. z is SplitMix64 of the flat index ((b Hq + h) L + i) S + j
// (../common/dropout.h), the same bits as the CPU kernels and native_attention_dropout_mask.
//
// Shapes: q (B, Hq, L, D), k (B, Hk, S, D), v (B, Hk, S, Dv) with any batch/head/position
// strides and a unit last-dim stride (the launcher copies a tensor that is not so, or whose rows
// are not 16-byte aligned, into a zero-padded aligned buffer); mask broadcast to (B, Hq, L, S)
// and read through its strides (stride 0 on broadcast dims, never expanded); out laid out as
// fastattn.reference.attention_output; lse (B, Hq, L) float32. Limits (checked, TORCH_CHECK):
// float16 / bfloat16 inputs (TORCH_CHECK_TYPE otherwise), head dims 1..256 (D and Dv may differ;
// the larger picks kD), batch and query heads up to 65535 each (grid dims y and z); masks of
// bool or any float dtype, dropout, softcap, windows and GQA are all served.
//
// Algorithm (per kernel; Bm query rows, Bn keys per tile, head dims padded on chip to kD, one of
// 32, 64, 96, 128, 192, 256, with zero-filled shared memory):
// - Forward: one CTA of 4 warps per (query tile of 64 rows, head, batch), 16 rows per warp. The
//   Q tile and a double-buffered ring of K/V tiles (cp.async, the next tile loading while the
//   current one is used) sit in shared memory with rows padded by 16 bytes, so ldmatrix reads
//   of 8 rows hit 8 different bank groups. S = Q K^T on tensor cores (fp32 accumulators),
//   scores in base 2 (scale * log2 e folded in), softcap / mask / window applied on the
//   register tile, online softmax (running max and sum per row, quad shuffles for the row
//   max), P converted to 16 bits in registers and used directly as the A operand of O += P V.
//   Only key tiles some row of the tile can see are visited (causal and window skipping), and
//   only tiles on the edge of the band pay for position checks. Heavy (late, causal) query
//   tiles are scheduled first.
// - Forward on Hopper (attention_fwd_kernel<T, kD, true>: compute capability 9.x, sm_90a,
//   FASTATTN_CUDA_WGMMA not "0"): the same softmax, each four warps acting as one warpgroup of
//   64 query rows; from head dim 96 up a CTA holds two warpgroups (128 rows) that
//   share each K/V tile, below it one (Tiles::fwd_groups: ptxas's register counts give an SM
//   two warpgroups either way from 96 up, and three or four one-warpgroup CTAs below). Per
//   warpgroup, S = Q K^T is one wgmma m64nBNk16 chain reading Q and K from shared memory, O +=
//   P V a wgmma chain with P from registers and V read as an MN-major operand, so no ldmatrix
//   is issued; the tiles sit in wgmma's core-matrix layout (8 x 8 blocks of 128 bytes, no
//   swizzle; csrc/common/wgmma_layout.h). With two warpgroups the softmax of key tile j runs
//   while the tensor cores compute O += P_{j-1} V_{j-1} (FA3's intra-warpgroup overlap), K and
//   V then having rings of their own (tile j needs K_j and V_{j-1} at once); with one, each
//   product is waited for before its result is used (fwd_wgmma says why).
// - Forward on Hopper with TMA (attention_fwd_tma_kernel, head dims 64 up, FASTATTN_CUDA_TMA not
//   "0", and inputs a tensor map can describe: no stride 0): the two-warpgroup schedule above with
//   warp specialisation, as FA3: a third, producer warpgroup (its registers given to the consumers
//   by setmaxnreg) issues every tile load as TMA boxes, and mbarriers (full and empty per stage)
//   replace the per-tile __syncthreads, so each consumer warpgroup waits only for the tile it needs
//   (fwd_tma); at head dim 64 it stands in for the one-warpgroup forward above (Tiles::kFwdTma says
//   why). Its key tiles (Tiles::fwd_tma_n) are of 128 keys at head dims 64 to 128, 64 at 192 and
//   256, where a call has no dropout, and for dropout, whose per-score hash costs registers, a
//   second build of the kernel with 64 at 128 and 32 at 256. The TMA kernels' tiles are swizzled
//   (wgmma_layout.h: SwizzleLayout, 128-byte rows at head dims 64, 128 and up, 64-byte at 96), one
//   box per column block of the swizzle's width, as FA3 and CUTLASS load them. At head dims 64 to
//   128 the two consumer warpgroups also take turns on the tensor cores (FA3's ping-pong,
//   TensorCoreTurns): one issues its S_j and O += P_{j-1} V_{j-1} while the other runs its softmax
//   (FASTATTN_CUDA_PINGPONG=0 turns it off, for comparing the two).
// - Backward: a preprocess kernel, delta = rowsum(dO * O) and lse in base 2 (+inf for a fully
//   masked row, so its probabilities recompute as 0); a dK/dV kernel, one CTA of 8 warps per
//   key tile (64 keys) looping over the query tiles of every query head of its group (Q, dO,
//   lse, delta double-buffered): S^T = K Q^T and dP^T = V dO^T per warp (16 keys x half the
//   query tile), P^T and dS^T staged in shared memory as 16-bit tiles, then dV += P^T dO and
//   dK += dS^T Q with each warp owning 16 keys x half the head dim (so head dim 256 fits the
//   register file); and a dQ kernel, one CTA of 4 warps per query tile looping over key tiles:
//   S, dP = dO V^T, dS in registers, dQ += dS K (on Hopper as wgmma chains, the forward's
//   operand patterns: Q, dO, K, V K-major for S and dP, K MN-major for dQ). Every gradient
//   element has one owner and is written once: no atomics, bitwise reproducible, as the CPU
//   backward.
// - dK/dV on Hopper (attention_bwd_dkdv_kernel<T, kD, true>, picked with the Hopper forward):
//   the same CTA (64 keys, 8 warps) as two warpgroups, the key tile being wgmma's M of 64, split
//   by product rather than by head dim: warpgroup 0 computes S^T = K Q^T, P^T and dV += P^T dO,
//   warpgroup 1 dP^T = V dO^T, dS'^T and dK += dS'^T Q, with P handed from one to the other
//   through shared memory as fp32. P^T and dS'^T stay in registers as A operands (no 16-bit
//   staging); each thread holds one 64 x kD accumulator, kD / 2 floats, so head dim 256 fits.
// - dK/dV on Hopper with TMA (attention_bwd_dkdv_tma_kernel, head dims 96 up, picked as the
//   TMA forward): those two warpgroups as consumers of a producer warpgroup that loads K and V
//   once and each query tile's Q and dO as TMA boxes (lse2 and delta by its first warp), with
//   full / empty mbarriers per stage, and P double-buffered, so the hand-over of P is the one
//   barrier per query tile (dkdv_tma).
// - dQ on Hopper with TMA (attention_bwd_dq_tma_kernel, picked likewise): two consumer
//   warpgroups (128 query rows sharing each K/V tile) of the dQ kernel's wgmma products and a
//   producer warpgroup loading Q and dO once and K_j, V_j into a two-stage ring (dq_tma); its
//   key tiles (Tiles::kDqTmaN) are of 128 keys up to head dim 128, 64 at 192, 32 at 256.
//
// Work: forward 2 L S (D + Dv) flops per head (halved by causal skipping), backward 2.5x that;
// each score tile is computed once forward, twice backward (dK/dV and dQ kernels). Memory: the
// backward's delta and base-2 lse (B Hq L floats each), dmask only when asked.
//
// Checked without a GPU: tests/test_cuda_emulation.py runs these kernels (both sets)
// unchanged, through attention_fwd_impl / attention_bwd_impl below, in a CPU emulation of the
// CUDA model (tests/cuda_emulation/; the FASTATTN_CUDA_EMULATION guard below lets it supply the
// PTX pieces), against the float64 reference; nvcc compiles them for sm_80 and sm_90a in CI,
// where smem_fits holds every CTA's shared memory to an A100's and an H100's opt-in limits.
//
// Not yet (first version, not yet run on a GPU): float32 / float64 inputs (TypeError: the
// triton or torch backend serves them), a SIMT fallback; on Hopper, TMA and warp
// specialisation at head dim 32 and in dQ and dK/dV below 96, three consumer warpgroups in the
// forward at head dim 64 (FA3's), TMA stores,
// swizzled tiles in the cp.async Hopper kernels (theirs are in the no-swizzle core-matrix
// layout), taking turns on the tensor cores in dQ and dK/dV (in dK/dV, one warpgroup's
// elementwise work against the other's products) and above head dim 128; split-KV, a
// persistent scheduler, vectorised mask loads (masks are read one element per score, through
// their strides), tuning of tile sizes. Performance is to be measured with the harness on a
// GPU.

#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/checks.h"
#include "../common/dropout.h"
#include "../common/cuda_rows.cuh"
#ifndef FASTATTN_CUDA_EMULATION  // a CPU emulation of the CUDA model provides the PTX pieces
#include "../common/mma.cuh"
#endif
#include "../common/wgmma_layout.h"
#include "attention_args.h"

namespace fastattn::cuda {
namespace attention {


constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr double kLog2eD = 1.4426950408889634;

enum AttnMaskKind : int { kAttnNoMask = 0, kAttnBoolMask = 1, kAttnAdditiveMask = 2 };

// Everything the kernels read, by value. Strides are in elements, 64-bit; the inputs' last-dim
// stride is 1 and their rows are 16-byte aligned, `d_load` / `dv_load` columns per row are
// readable (multiples of 8, zero beyond D / Dv).
struct AttnParams {
  const void* q;
  const void* k;
  const void* v;
  int64_t sq[3], sk[3], sv[3];  // batch, head, position
  int d_load, dv_load;
  int D, Dv;
  int64_t B, Hq, Hk, group, L, S;
  const void* mask;
  int mask_kind;
  int mask_dtype;  // cuda_rows.cuh DType code
  int64_t sm[4];
  float scale;        // dq, dk: scale * sum ds' k
  float score_scale;  // scale * log2 e, or scale / softcap under softcap
  float cap_log2;     // softcap * log2 e
  bool softcap;
  bool has_left, has_right;
  int64_t left, right, offset;
  bool dropout;
  uint64_t seed;            // used when seed_ptr is null
  const int64_t* seed_ptr;  // a seed on the device, read by the kernels (no host sync)
  uint64_t threshold;
  float drop_scale;  // 1 / (1 - dropout_p)
  // forward
  void* out;
  int64_t so[4];
  bool out_vec;  // 16-byte stores allowed
  float* lse;
  // backward
  const void* dout;  // grad_out, q's dtype, like v (dv_load columns readable)
  int64_t sdo[3];
  const void* out_in;  // the forward's output (any float dtype, strides soi), for delta
  int out_dtype;
  int64_t soi[4];
  const float* lse_in;  // (B, Hq, L) contiguous, the forward's lse
  float* lse2;          // (B, Hq, L): lse * log2 e, +inf for fully masked rows (preprocess)
  float* delta;         // (B, Hq, L): rowsum(dO * O) (preprocess)
  void* dq;
  void* dk;
  void* dv;
  int64_t sdq[4], sdk[4], sdv[4];
  bool dq_vec, dk_vec, dv_vec;
  float* dmask;  // (B, Hq, L, S) contiguous, or null
};

// The Hopper TMA forward's parameters (fwd_tma): q, k and v also as tensor maps whose boxes
// land in the swizzled layout (encoded by the launch logic: tile_box). The kernel takes them as
// __grid_constant__, so the maps have addresses TMA can read. Not in AttnParams: a map's 64-byte
// alignment there costs the other kernels registers (ptxas: 118 -> 144 for the Hopper forward
// at head dim 32).
struct TmaFwdParams {
  AttnParams p;
  CUtensorMap q, k, v;
  bool turns;  // the consumer warpgroups take turns (TensorCoreTurns; Launcher::turns())
};
// The Hopper TMA backward kernels' (dq_tma, dkdv_tma): q, k, v and dout as tensor maps, as
// TmaFwdParams.
struct TmaBwdParams {
  AttnParams p;
  CUtensorMap q, k, v, dout;
};

// The mbarriers of the TMA backward kernels (dq_tma, dkdv_tma) at `at`: `once` for the pair of
// tiles the producer loads once (its arrival with their bytes; complete when they have landed),
// then a two-stage ring for the pair it loads per step: full[st] likewise, empty[st] one
// arrival per consumer warp once its products have read the stage (warp_release).
struct TmaRing {
  static constexpr int kBarriers = 5;
  uint64_t* once;
  uint64_t* full;   // [2]
  uint64_t* empty;  // [2]

  __device__ __forceinline__ explicit TmaRing(void* at)
      : once(static_cast<uint64_t*>(at)), full(once + 1), empty(once + 3) {}
  // By thread 0, as tma_cta_start's init.
  __device__ __forceinline__ void init(int consumer_warps) const {
    mbar_init(once, 1);
    for (int st = 0; st < 2; ++st) {
      mbar_init(full + st, 1);
      mbar_init(empty + st, consumer_warps);
    }
  }
};

// Tile shapes per kernel and padded head dim. Rows of every 16-bit shared tile are padded by 8
// elements (16 bytes): a row pitch of an odd number of 16-byte units puts the 8 rows one
// ldmatrix phase reads in 8 different 16-byte bank groups (no conflicts), for every kD.
template <int kD>
struct Tiles {
  static constexpr int kLds = kD + 8;
  // forward and dQ: 4 warps, 64 query rows, 64 keys (32 above head dim 128: the fp32 output or
  // dQ accumulator takes kD / 2 registers per thread). 16 rows per warp.
  static constexpr int kFwdM = 64;
  // The Hopper forward: warpgroups of 64 rows sharing the K/V tiles, two per CTA from head dim
  // 96 up (half the K/V traffic per row; by ptxas's register counts an SM holds two warpgroups
  // either way), one below (a two-warpgroup CTA's registers would hold an SM to two warpgroups
  // where one-warpgroup CTAs fit three or four).
  template <bool kWgmma>
  static constexpr int fwd_groups = kWgmma && kD >= 96 ? 2 : 1;
  template <bool kWgmma>
  static constexpr int fwd_m = 64 * fwd_groups<kWgmma>;
  template <bool kWgmma>
  static constexpr int fwd_threads = 2 * fwd_m<kWgmma>;
  // The Hopper kernels with TMA (fwd_tma, dq_tma, dkdv_tma) serve the head dims whose two-warpgroup
  // CTAs hold an SM alone anyway (by their register counts): those two consumer warpgroups and
  // a producer warpgroup; the tiles in the swizzled layout from a 1024-byte boundary (up to
  // kSwizzleSlack bytes skipped to reach it), then the mbarriers. Below head dim 96
  // the forward has one-warpgroup CTAs and dK/dV fits two CTAs an SM, which a producer
  // warpgroup's register split (one CTA an SM) would cost.
  static constexpr bool kTma = kD >= 96;
  // The TMA forward serves head dim 64 too, with the same two consumer warpgroups (kFwdTmaM
  // query rows) taking turns on the tensor cores, against the cp.async forward's three or four
  // one-warpgroup CTAs an SM interleaving by themselves: which is faster is for the sweep on a
  // GPU to say (its no-tma provider times the cp.async one). FA3's forward at head dim 64 is
  // warp-specialised too (with three consumer warpgroups of 64 rows).
  static constexpr bool kFwdTma = kD >= 64;
  static constexpr int kFwdTmaM = 128;
  static constexpr int kTmaThreads = 3 * 128;
  // Registers a thread after the split (setmaxnreg): 128 x 24 + 256 x 240 fit the 64K of an SM.
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
  static constexpr int kTmaBarriers = 9;  // Q; K full and empty, V full and empty, two stages
  static constexpr int kDqTmaM = 128;  // dQ with TMA: two warpgroups' query rows
  // dQ with TMA: keys a tile, the most (of 32, 64, 128) whose two stages of K and V fit shared
  // memory beside Q and dO. Their S and dP (BN / 2 accumulators a thread each) fit the
  // consumers' registers beside dQ's kD / 2, with dropout and masks (ptxas: no spill).
  static constexpr int kDqTmaN = kD <= 128 ? 128 : kD == 192 ? 64 : 32;
  static constexpr int kSwizzleSlack = 1024;  // swizzle_base's step
  static constexpr int kFwdN = kD <= 128 ? 64 : 32;
  // The TMA forward's key tiles, for its kernel built with dropout or without (kDropout): the
  // largest of 32, 64 and 128 keys whose scores fit a consumer's 240 registers beside the
  // output's kD / 2 and the previous P's (ptxas: no spill), and two K and two V stages of
  // which fit shared memory.
  //   head dim      64    96   128   192   256
  //   no dropout   128   128   128    64    64
  //   dropout      128   128    64    64    32
  // Dropout's per-score hash and keep test cost registers: with it, 128 keys at head dim 128
  // spill 372 bytes a thread and 64 at 256 spill 72; without it, 128 at 256 spill 232 (and
  // serialise wgmma). At 192, 128-key stages would take 242 KB of shared memory.
  template <bool kDropout>
  static constexpr int fwd_tma_n = kD <= 96    ? 128
                                   : kD == 128 ? (kDropout ? 64 : 128)
                                   : kD == 192 ? 64
                                               : (kDropout ? 32 : 64);
  // Whether the TMA forward has a kernel without dropout beside the one with it (run_fwd
  // launches it when dropout is off): where their key tiles differ.
  static constexpr bool kFwdTmaNoDropout = fwd_tma_n<false> != fwd_tma_n<true>;
  // per warp: n-tiles of S and of O, k-steps of Q K^T and of P V
  static constexpr int kFwdNT = kFwdN / 8, kFwdDT = kD / 8, kFwdKS = kD / 16, kFwdPS = kFwdN / 16;
  // dK/dV: 8 warps (two warpgroups on Hopper), 64 keys, 64 query rows (32 above head dim 128,
  // for shared memory and, on Hopper, the fp32 hand-over of P).
  static constexpr int kKvN = 64;
  static constexpr int kKvM = kD <= 128 ? 64 : 32;
  static constexpr int kLdp = kKvM + 8;

  // Q staged with pitch kLds (the output tile reuses it); two K and two V stages with pitch
  // kLds, or with kWgmma in wgmma's core-matrix layout (core_offset, wgmma_layout.h), unpadded
  // (with two warpgroups the V ring runs one key tile behind the K ring: fwd_wgmma).
  template <bool kWgmma>
  static constexpr size_t fwd_smem(int elem) {
    return static_cast<size_t>(fwd_m<kWgmma> * kLds + 4 * kFwdN * (kWgmma ? kD : kLds)) * elem;
  }
  // The TMA forward: Q (kFwdTmaM rows, pitch kLds for the epilogue), two K and two V stages,
  // swizzled; then the mbarriers.
  template <bool kDropout>
  static constexpr size_t fwd_tma_smem(int elem) {
    return static_cast<size_t>(kFwdTmaM * kLds + 4 * fwd_tma_n<kDropout> * kD) * elem +
           kTmaBarriers * sizeof(uint64_t) + kSwizzleSlack;
  }
  // dQ: Q and dO with pitch kLds (the dQ tile reuses Q's); K and V as in the forward.
  template <bool kWgmma>
  static constexpr size_t dq_smem(int elem) {
    return static_cast<size_t>(2 * kFwdM * kLds + 4 * kFwdN * (kWgmma ? kD : kLds)) * elem;
  }
  // dK/dV: K, V and the two-stage Q / dO ring with pitch kLds, P^T and dS'^T staged with pitch
  // kLdp; with kWgmma the tiles in core-matrix layout, unpadded, and instead of the staged
  // 16-bit tiles P and 1 - tanh^2 (64 x kKvM floats each) handed from one warpgroup to the
  // other. Both: lse2 and delta per stage.
  template <bool kWgmma>
  static constexpr size_t dkdv_smem(int elem) {
    if constexpr (kWgmma) {
      return static_cast<size_t>(2 * kKvN + 4 * kKvM) * kD * elem +
             static_cast<size_t>(2 * kKvN * kKvM + 4 * kKvM) * sizeof(float);
    }
    return static_cast<size_t>(2 * kKvN + 4 * kKvM) * kLds * elem +
           static_cast<size_t>(2 * kKvN) * kLdp * elem + 4 * kKvM * sizeof(float);
  }
  // dQ with TMA: Q and dO (kDqTmaM rows), two K and two V stages, swizzled; then the
  // mbarriers (dq_tma).
  static constexpr size_t dq_tma_smem(int elem) {
    return static_cast<size_t>(2 * kDqTmaM + 4 * kDqTmaN) * kD * elem +
           TmaRing::kBarriers * sizeof(uint64_t) + kSwizzleSlack;
  }
  // dK/dV with TMA: dkdv_wgmma's tiles, swizzled, P and 1 - tanh^2 double-buffered, then the
  // mbarriers.
  static constexpr size_t dkdv_tma_smem(int elem) {
    return static_cast<size_t>(2 * kKvN + 4 * kKvM) * kD * elem +
           static_cast<size_t>(4 * kKvN * kKvM + 4 * kKvM) * sizeof(float) +
           TmaRing::kBarriers * sizeof(uint64_t) + kSwizzleSlack;
  }
};

// Whether every attention kernel's CTA at head dim kD (16-bit elements) fits the shared memory
// a CTA may opt in to: 163 KB on an A100 for the sm_80 kernels, 227 KB on an H100 for the
// Hopper ones. Held at compile time (run_fwd, run_bwd), so a tile change that breaks it fails
// the build rather than the launch's check on a GPU.
template <int kD>
constexpr bool smem_fits() {
  using C = Tiles<kD>;
  constexpr size_t sm80 = 163 * 1024, sm90 = 227 * 1024;
  return C::template fwd_smem<false>(2) <= sm80 && C::template dq_smem<false>(2) <= sm80 &&
         C::template dkdv_smem<false>(2) <= sm80 && C::template fwd_smem<true>(2) <= sm90 &&
         C::template dq_smem<true>(2) <= sm90 && C::template dkdv_smem<true>(2) <= sm90 &&
         (!C::kFwdTma || (C::template fwd_tma_smem<false>(2) <= sm90 &&
                          C::template fwd_tma_smem<true>(2) <= sm90)) &&
         (!C::kTma || (C::dq_tma_smem(2) <= sm90 && C::dkdv_tma_smem(2) <= sm90));
}

// The wgmma descriptor of a shared-memory operand starting at `start` whose core matrices lie
// `strides` apart (wgmma_layout.h).
__device__ __forceinline__ uint64_t wgmma_desc(const void* start, CoreStrides strides) {
  return wgmma_desc_bits(smem_addr(start), strides);
}

// Copies rows [row0, row0 + ROWS) of a row-major matrix (`pitch` elements between rows, `rows`
// rows, `width` readable columns, a multiple of 8) into a ROWS x kD shared tile, 16 bytes per
// cp.async; rows past the end and columns past `width` are zero-filled (the zeros leave dot
// products unchanged and give padded keys zero weight). Layout: rows with pitch kLds, or with
// kCore wgmma's core matrices (core_offset; ROWS a multiple of 8), where consecutive threads
// take consecutive rows of a core matrix so that their 16-byte writes hit distinct banks.
template <typename T, int ROWS, int kD, int THREADS, bool kCore = false>
__device__ __forceinline__ void load_tile(T* tile, const T* base, int64_t pitch, int64_t row0,
                                          int64_t rows, int width) {
  constexpr int kChunks = kD / 8;
  constexpr int kLds = kD + 8;
  constexpr int kSteps = (ROWS * kChunks + THREADS - 1) / THREADS;
  static_assert(!kCore || ROWS % 8 == 0, "core matrices hold 8 rows");
#pragma unroll
  for (int step = 0; step < kSteps; ++step) {
    const int idx = step * THREADS + static_cast<int>(threadIdx.x);
    if (ROWS * kChunks % THREADS != 0 && idx >= ROWS * kChunks) break;
    int r, c;
    if constexpr (kCore) {
      r = (idx / 8 / kChunks) * 8 + idx % 8;
      c = (idx / 8 % kChunks) * 8;
    } else {
      r = idx / kChunks;
      c = (idx % kChunks) * 8;
    }
    const int64_t row = row0 + r;
    const bool ok = row < rows && c < width;
    T* dst = tile + (kCore ? core_offset<kD>(r, c) : r * kLds + c);
    cp_async_16(dst, ok ? base + row * pitch + c : base, ok ? 16 : 0);
  }
}

// The keys [lo, hi) some query row in [i0, i1] may see (window and sequence end); hi <= lo when
// none.
__device__ __forceinline__ void visible_keys(const AttnParams& p, int64_t i0, int64_t i1,
                                             int64_t& lo, int64_t& hi) {
  lo = p.has_left ? max(int64_t(0), i0 + p.offset - p.left) : 0;
  hi = p.has_right ? min(p.S, i1 + p.offset + p.right + 1) : p.S;
}

// The key tiles (of BN keys) [lo, hi) holding some key a query row in [i0, i1] may see
// (visible_keys); hi = lo when none.
template <int BN>
__device__ __forceinline__ void visible_key_tiles(const AttnParams& p, int64_t i0, int64_t i1,
                                                  int64_t& lo, int64_t& hi) {
  int64_t klo, khi;
  visible_keys(p, i0, i1, klo, khi);
  lo = klo / BN;
  hi = khi > klo ? (khi + BN - 1) / BN : lo;
}

// Whether every (query, key) pair of rows [i0, i0 + M) and keys [j0, j0 + N) lies inside the
// window and keys < S: such a tile needs no position checks.
template <int M, int N>
__device__ __forceinline__ bool full_tile(const AttnParams& p, int64_t i0, int64_t j0) {
  return j0 + N <= p.S && (!p.has_left || j0 >= i0 + M - 1 + p.offset - p.left) &&
         (!p.has_right || j0 + N - 1 <= i0 + p.offset + p.right);
}

__device__ __forceinline__ uint64_t seed_of(const AttnParams& p) {
  return p.seed_ptr != nullptr ? static_cast<uint64_t>(*p.seed_ptr) : p.seed;
}

// Whether element (b, h, i, j) survives dropout (i < L, j < S).
__device__ __forceinline__ bool keep_at(const AttnParams& p, uint64_t seed, int64_t b, int64_t h,
                                        int64_t i, int64_t j) {
  const uint64_t index = static_cast<uint64_t>(((b * p.Hq + h) * p.L + i) * p.S + j);
  return dropout_keep(seed, index, p.threshold);
}

// The score of query i and key j in base 2 from the raw product x = q_i.k_j: scaled, soft-capped
// (tanh written to `th` for the backward), masked; -inf where masked or (when `edge`) outside
// the window or past the keys. Rows past L read no mask and are never stored.
__device__ __forceinline__ float score2(const AttnParams& p, float x, int64_t b, int64_t h,
                                        int64_t i, int64_t j, bool edge, float& th) {
  float s;
  if (p.softcap) {
    th = tanhf(x * p.score_scale);
    s = th * p.cap_log2;
  } else {
    th = 0.f;
    s = x * p.score_scale;
  }
  if (p.mask_kind != kAttnNoMask && i < p.L && j < p.S) {
    const int64_t mi = b * p.sm[0] + h * p.sm[1] + i * p.sm[2] + j * p.sm[3];
    if (p.mask_kind == kAttnBoolMask) {
      if (static_cast<const uint8_t*>(p.mask)[mi] == 0) s = -INFINITY;
    } else {
      const float a = load_as<float>(p.mask, p.mask_dtype, mi);
      // Scaling to base 2 must not turn a finite large negative (finfo.min, as Hugging Face
      // pads) into -inf: such a row stays a uniform softmax, as in PyTorch.
      s = a == -INFINITY ? -INFINITY : s + fmaxf(a * kLog2e, -3.402823466e38f);
    }
  }
  if (edge && (j >= p.S || (p.has_left && j < i + p.offset - p.left) ||
               (p.has_right && j > i + p.offset + p.right))) {
    s = -INFINITY;
  }
  return s;
}

// Stores a 16-bit tile held in shared memory (rows r < nrows of `tile`, pitch kLds) to global
// row-major rows at `base` + r * pitch_r, columns c < width with column stride pitch_c; 16-byte
// stores when `vec` (width % 8 == 0, unit column stride, aligned rows), else one element each.
template <typename T, int kLds>
__device__ __forceinline__ void store_rows(const T* tile, T* base, int64_t pitch_r,
                                           int64_t pitch_c, int nrows, int width, bool vec,
                                           int lane, int lanes) {
  if (vec) {
    const int chunks = width / 8;
    for (int idx = lane; idx < nrows * chunks; idx += lanes) {
      const int r = idx / chunks, c = (idx % chunks) * 8;
      *reinterpret_cast<uint4*>(base + r * pitch_r + c) =
          *reinterpret_cast<const uint4*>(tile + r * kLds + c);
    }
  } else {
    for (int idx = lane; idx < nrows * width; idx += lanes) {
      const int r = idx / width, c = idx % width;
      base[r * pitch_r + c * pitch_c] = tile[r * kLds + c];
    }
  }
}

// Writes a warp's accumulators (acc[n][e]: row `row` + 8 (e / 2), column `col` + 8 n + 2t + e % 2,
// the mma.sync and wgmma layout) times `scale` into a 16-bit shared tile of pitch LDS.
template <typename T, int LDS, int NT>
__device__ __forceinline__ void stage_fragment(T* tile, const float (&acc)[NT][4], int row,
                                               int col, float scale) {
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      *reinterpret_cast<uint32_t*>(tile + (row + 8 * r) * LDS + col + n * 8 + 2 * t) =
          pack2<T>(acc[n][2 * r] * scale, acc[n][2 * r + 1] * scale);
    }
  }
}

// The key-tile loop of the forward and dQ kernels (THREADS threads): waits until key/value
// tile `nb`, in stage `st` of the two-stage ring sK / sV, has landed, after starting the copy
// of tile nb + 1 into the other stage (the previous iteration's closing barrier freed it).
// kCore: stages in wgmma's core-matrix layout, made visible to its async proxy before the
// barrier.
template <typename T, int BN, int kD, int THREADS, bool kCore = false>
__device__ __forceinline__ void next_kv_tile(T* sK, T* sV, const T* kb, const T* vb,
                                             const AttnParams& p, int64_t nb, int64_t nb_hi,
                                             int st) {
  constexpr int kStage = BN * (kCore ? kD : Tiles<kD>::kLds);
  if (nb + 1 < nb_hi) {
    load_tile<T, BN, kD, THREADS, kCore>(sK + (st ^ 1) * kStage, kb, p.sk[2], (nb + 1) * BN,
                                         p.S, p.d_load);
    load_tile<T, BN, kD, THREADS, kCore>(sV + (st ^ 1) * kStage, vb, p.sv[2], (nb + 1) * BN,
                                         p.S, p.dv_load);
    cp_async_commit();
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
  if constexpr (kCore) fence_proxy_async();
  __syncthreads();
}

// --- forward -------------------------------------------------------------------------------

// Where a forward CTA works: its query tile (the last, heaviest causal tiles first), head, batch,
// the K/V head of its group, and the key tiles [nb_lo, nb_hi) some of its rows can see.
template <typename T, int BM, int BN>
struct FwdTile {
  int64_t m0, h, b, nb_lo, nb_hi;
  const T *qb, *kb, *vb;

  __device__ __forceinline__ explicit FwdTile(const AttnParams& p) {
    const int64_t tiles = (p.L + BM - 1) / BM;
    m0 = (tiles - 1 - blockIdx.x) * BM;
    h = blockIdx.y;
    b = blockIdx.z;
    const int64_t hk = h / p.group;
    qb = static_cast<const T*>(p.q) + b * p.sq[0] + h * p.sq[1];
    kb = static_cast<const T*>(p.k) + b * p.sk[0] + hk * p.sk[1];
    vb = static_cast<const T*>(p.v) + b * p.sv[0] + hk * p.sv[1];
    visible_key_tiles<BN>(p, m0, min(m0 + BM, p.L) - 1, nb_lo, nb_hi);
  }
};

// The key tiles [lo, hi) (of BN keys) that some of the query rows [i0, min(i0 + 64, L)) see
// (visible_key_tiles): a Hopper warpgroup's own part of its CTA's tiles (FwdTile), which on a
// causal diagonal or a window's edge is smaller, the other warpgroup's rows seeing more. Empty
// (lo = hi) for rows past L.
template <int BN>
struct WarpgroupTiles {
  int64_t lo = 0, hi = 0;

  __device__ __forceinline__ WarpgroupTiles(const AttnParams& p, int64_t i0) {
    if (i0 < p.L) visible_key_tiles<BN>(p, i0, min(i0 + 64, p.L) - 1, lo, hi);
  }
  __device__ __forceinline__ bool has(int64_t nb) const { return nb >= lo && nb < hi; }
};

// The two consumer warpgroups of fwd_tma taking turns on the tensor cores (FA3's ping-pong, its
// "warp scheduler barrier"): per key tile of the CTA, a warpgroup waits for its turn (wait),
// issues its products (S_j, then O += P_{j-1} V_{j-1}) and hands the turn to the other (pass),
// then runs its softmax while the other's products occupy the tensor cores. Warpgroup 0 goes
// first: warpgroup 1 arrives on its barrier once (first). Each warpgroup takes one turn per key
// tile of the CTA, computing it or not (WarpgroupTiles), and warpgroup 1 does not pass its last
// turn, so every bar.arrive has its bar.sync and both barriers end the CTA with no arrival
// pending. Named barriers kFirstId (warpgroup 0's) and kFirstId + 1, 256 threads each: the
// arriving warpgroup and the waiting one. kOn false: no turns (fwd_wgmma, and fwd_tma where FA3
// keeps them off, above head dim 128); `on` false likewise, at run time (Launcher::turns(), the
// same for the whole CTA).
template <bool kOn>
struct TensorCoreTurns {
  static constexpr int kFirstId = 2;  // 1 is the consumers' barrier (fwd_tma's epilogue)
  bool on;
  int wg;
  int64_t last;  // the CTA's last key tile: warpgroup 1 keeps its turn there

  __device__ __forceinline__ void first() const {
    if (kOn && on && wg == 1) named_barrier_arrive(kFirstId, 256);
  }
  __device__ __forceinline__ void wait() const {
    if (kOn && on) named_barrier_sync(kFirstId + wg, 256);
  }
  __device__ __forceinline__ void pass(int64_t nb) const {
    if (kOn && on && (wg == 0 || nb != last)) named_barrier_arrive(kFirstId + (wg ^ 1), 256);
  }
};

// A warp's 16 query rows in the forward (rows g and g + 8 of the warp's 16 from m0 on): their
// indices, the output accumulators (o[dt][e]: row rows[e / 2], column 8 dt + 2t + e % 2, the
// mma.sync and wgmma layout), and the online softmax's running base-2 max and partial sum.
template <int DT>
struct FwdRows {
  int64_t rows[2];
  float o[DT][4];
  float row_m[2] = {-INFINITY, -INFINITY};
  float row_l[2] = {0.f, 0.f};

  __device__ __forceinline__ explicit FwdRows(int64_t m0) {
    rows[0] = m0 + (threadIdx.x / 32) * 16 + (threadIdx.x % 32) / 4;
    rows[1] = rows[0] + 8;
#pragma unroll
    for (int i = 0; i < DT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  }

  // o's two rows times alpha[0] and alpha[1].
  __device__ __forceinline__ void rescale(const float (&alpha)[2]) {
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      o[dt][0] *= alpha[0];
      o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1];
      o[dt][3] *= alpha[1];
    }
  }
};

// One key tile of the forward, after S = Q K^T for this warp's 16 rows (s[nt][e]: row
// rows[e / 2], key n0 + nt * 8 + 2t + e % 2, the mma accumulator layout): scores in base 2,
// the online softmax (row_m / row_l updated; alpha, the factor the output accumulated so far
// takes, returned for FwdRows::rescale) and dropout where p asks for it and the kernel serves it
// (kDropout: fwd_tma's kernel without dropout leaves its code out); s then holds P.
template <bool kDropout, int NT, int DT>
__device__ __forceinline__ void fwd_softmax_tile(const AttnParams& p, float (&s)[NT][4],
                                                 float (&alpha)[2], FwdRows<DT>& fr, int64_t b,
                                                 int64_t h, int64_t n0, bool edge,
                                                 uint64_t seed) {
  const int t = threadIdx.x % 4;
  const int64_t (&rows)[2] = fr.rows;
  float (&row_m)[2] = fr.row_m;
  float (&row_l)[2] = fr.row_l;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float th;
      s[nt][e] = score2(p, s[nt][e], b, h, rows[e / 2], n0 + nt * 8 + 2 * t + (e & 1), edge, th);
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
    // The four threads of a group hold the row between them.
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_new = fmaxf(row_m[r], mx);
    // A row with nothing visible yet has max -inf: subtract 0 instead so exp2 gives 0, not
    // NaN (-inf - -inf).
    const float m_safe = m_new == -INFINITY ? 0.f : m_new;
    alpha[r] = exp2f(row_m[r] - m_safe);
    row_m[r] = m_new;
    row_l[r] *= alpha[r];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const float e2 = exp2f(s[nt][2 * r + c] - m_safe);
        row_l[r] += e2;
        s[nt][2 * r + c] = e2;
      }
    }
  }
  // The sum above is before dropout: dropped weights leave the product only.
  if (kDropout && p.dropout) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t i = rows[e / 2], j = n0 + nt * 8 + 2 * t + (e & 1);
        if (s[nt][e] != 0.f && i < p.L && j < p.S && !keep_at(p, seed, b, h, i, j)) {
          s[nt][e] = 0.f;
        }
      }
    }
  }
}

// The forward's end, after every key tile: normalise, write lse, stage this warp's 16 output
// rows in `stage` (pitch kLds; the Q tile's space, free by now) and store them.
template <typename T, int kD, int DT>
__device__ __forceinline__ void fwd_epilogue(const AttnParams& p, const FwdRows<DT>& fr,
                                             int64_t m0, int64_t b, int64_t h, T* stage) {
  constexpr int LDS = Tiles<kD>::kLds;
  const float (&o)[DT][4] = fr.o;
  const float (&row_m)[2] = fr.row_m;
  const float (&row_l)[2] = fr.row_l;
  const int64_t (&rows)[2] = fr.rows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  T* sO = stage + warp * 16 * LDS;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_l[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const bool dead = l == 0.f || row_m[r] == -INFINITY;  // no key seen: output 0, lse -inf
    const float inv = dead ? 0.f : p.drop_scale / l;
    const int64_t i = rows[r];
    if (t == 0 && i < p.L) {
      p.lse[(b * p.Hq + h) * p.L + i] = dead ? -INFINITY : (row_m[r] + log2f(l)) * kLn2;
    }
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      *reinterpret_cast<uint32_t*>(sO + (g + 8 * r) * LDS + dt * 8 + 2 * t) =
          pack2<T>(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
    }
  }
  __syncwarp();
  const int nrows = static_cast<int>(max(int64_t(0), min(int64_t(16), p.L - (m0 + warp * 16))));
  T* ob = static_cast<T*>(p.out) + b * p.so[0] + h * p.so[1] + (m0 + warp * 16) * p.so[2];
  store_rows<T, LDS>(sO, ob, p.so[2], p.so[3], nrows, p.Dv, p.out_vec, lane, 32);
}

// The accumulators of S's n-tiles 2 kk and 2 kk + 1 (16 columns) as the A operand of the next
// product, in registers (mma.cuh: FlashAttention-2's register reuse of P).
template <typename T, int NT>
__device__ __forceinline__ void a_fragment(const float (&s)[NT][4], int kk, uint32_t (&a)[4]) {
  a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
  a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
  a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
  a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// Issues S (the warpgroup's 64 rows x N) = A B^T as one wgmma chain (Hopper kernels): A (64
// rows) and B (N rows) are K-major tiles of kD columns in the core-matrix layout LA / LB
// (wgmma_layout.h: CoreLayout, or the TMA kernels' SwizzleLayout); a k-step of 16 is two core
// matrices along K. The first step overwrites s (scale-d 0). The caller fences
// before and commits and waits after.
template <typename T, int kD, class LA = CoreLayout<kD>, class LB = LA, int NT>
__device__ __forceinline__ void wgmma_abt(float (&s)[NT][4], const T* sA, const T* sB) {
#pragma unroll
  for (int ks = 0; ks < kD / 16; ++ks) {
    wgmma_ss<T, NT * 8>(reinterpret_cast<float(&)[NT * 4]>(s),
                        wgmma_desc(sA + LA::offset(0, ks * 16), LA::k_major),
                        wgmma_desc(sB + LB::offset(0, ks * 16), LB::k_major), ks > 0);
  }
}

// Issues C (the warpgroup's 64 rows x kD) += P B as wgmma chains (Hopper kernels): P's
// k-steps already packed as A operands (pa, a_fragment: 16 columns each), B (16 PS rows x kD)
// an MN-major tile in the core-matrix layout LB: a k-step of 16 rows is two rows of core
// matrices, a chunk of NC columns of C NC / 8 core matrices. The caller packs every A fragment
// before its fence, so no wgmma of the group waits on a register written after it, and
// commits and waits after.
template <typename T, int kD, class LB = CoreLayout<kD>, int PS, int DT>
__device__ __forceinline__ void wgmma_pb(float (&c)[DT][4], const uint32_t (&pa)[PS][4],
                                         const T* sB) {
  constexpr int NC = kD % 64 == 0 ? 64 : 32;  // columns of C per wgmma
#pragma unroll
  for (int kk = 0; kk < PS; ++kk) {
#pragma unroll
    for (int ch = 0; ch < kD / NC; ++ch) {
      wgmma_rs<T, NC>(reinterpret_cast<float(&)[NC / 2]>(c[ch * NC / 8]), pa[kk],
                      wgmma_desc(sB + LB::offset(kk * 16, ch * NC), LB::mn_major), 1);
    }
  }
}

// The forward on sm_80 and newer: each warp's mma.sync, operands by ldmatrix from row-padded
// tiles; 64 query rows, 4 warps.
template <typename T, int kD>
__device__ __forceinline__ void fwd_mma(const AttnParams& p) {
  using Cfg = Tiles<kD>;
  constexpr int BM = Cfg::template fwd_m<false>, BN = Cfg::kFwdN, LDS = Cfg::kLds;
  constexpr int THREADS = Cfg::template fwd_threads<false>;
  constexpr int NT = Cfg::kFwdNT, DT = Cfg::kFwdDT, KS = Cfg::kFwdKS, PS = Cfg::kFwdPS;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);  // BM x LDS
  T* sK = sQ + BM * LDS;               // 2 x BN x LDS
  T* sV = sK + 2 * BN * LDS;           // 2 x BN x LDS

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const FwdTile<T, BM, BN> w(p);
  const int64_t m0 = w.m0, h = w.h, b = w.b;

  load_tile<T, BM, kD, THREADS>(sQ, w.qb, p.sq[2], m0, p.L, p.d_load);
  if (w.nb_lo < w.nb_hi) {
    load_tile<T, BN, kD, THREADS>(sK, w.kb, p.sk[2], w.nb_lo * BN, p.S, p.d_load);
    load_tile<T, BN, kD, THREADS>(sV, w.vb, p.sv[2], w.nb_lo * BN, p.S, p.dv_load);
  }
  cp_async_commit();

  const uint64_t seed = p.dropout ? seed_of(p) : 0;
  FwdRows<DT> fr(m0);
  const T* sQw = sQ + warp * 16 * LDS;

  for (int64_t nb = w.nb_lo; nb < w.nb_hi; ++nb) {
    const int st = static_cast<int>((nb - w.nb_lo) & 1);
    next_kv_tile<T, BN, kD, THREADS>(sK, sV, w.kb, w.vb, p, nb, w.nb_hi, st);
    const T* sKs = sK + st * BN * LDS;
    const T* sVs = sV + st * BN * LDS;
    const int64_t n0 = nb * BN;

    // S = Q K^T: this warp's 16 rows x BN keys.
    float s[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      uint32_t a[4];
      ldmatrix_x4(a, sQw + (lane % 16) * LDS + ks * 16 + (lane / 16) * 8);
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t bb[4];
        ldmatrix_x4(bb, sKs + (np * 16 + (lane % 8) + (lane / 16) * 8) * LDS + ks * 16 +
                            ((lane / 8) % 2) * 8);
        mma_16816<T>(s[2 * np], a, bb[0], bb[1]);
        mma_16816<T>(s[2 * np + 1], a, bb[2], bb[3]);
      }
    }
    float alpha[2];
    fwd_softmax_tile<true>(p, s, alpha, fr, b, h, n0, !full_tile<BM, BN>(p, m0, n0), seed);
    fr.rescale(alpha);

    // O += P V: P from the accumulators (a_fragment), V^T fragments by ldmatrix.trans.
#pragma unroll
    for (int kk = 0; kk < PS; ++kk) {
      uint32_t a[4];
      a_fragment<T>(s, kk, a);
#pragma unroll
      for (int dp = 0; dp < DT / 2; ++dp) {
        uint32_t bb[4];
        ldmatrix_x4_trans(bb, sVs + (kk * 16 + (lane % 16)) * LDS + dp * 16 + (lane / 16) * 8);
        mma_16816<T>(fr.o[2 * dp], a, bb[0], bb[1]);
        mma_16816<T>(fr.o[2 * dp + 1], a, bb[2], bb[3]);
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  cp_async_wait<0>();  // with no key tile, the Q copy may still be landing in sQ
  __syncthreads();
  fwd_epilogue<T, kD>(p, fr, m0, b, h, sQ);
}

// One key tile nb of the Hopper forward's softmax step for one warpgroup (fwd_wgmma, fwd_tma):
// in its tensor-core turn (turns: TensorCoreTurns), issues S = Q K_nb^T (Q at sQw in layout QL,
// K_nb's stage at sKs in KL); with kOverlap and past the first tile, then O += P_{nb-1} V_{nb-1}
// through issue_prev_pv() (pa, fr.o), and waits for S only, so the softmax runs while that
// product does; calls k_read() once S is complete (K_nb's stage is read), forms P_nb and the
// rescale factor, waits for the previous product and calls pv_read() (kOverlap past the first
// tile: V_{nb-1}'s stage and the old pa are read), rescales O and packs P_nb into pa. Without
// kOverlap the caller issues O += P_nb V_nb after it. kDropout: fwd_softmax_tile's.
template <typename T, int kD, bool kOverlap, bool kDropout, class QL, class KL, int BM, int BN,
          int DT, int PS, bool kTurns, class IssuePv, class KRead, class PvRead>
__device__ __forceinline__ void fwd_wgmma_step(const AttnParams& p, const FwdTile<T, BM, BN>& w,
                                               FwdRows<DT>& fr, uint32_t (&pa)[PS][4],
                                               const T* sQw, const T* sKs, int64_t nb,
                                               uint64_t seed, const TensorCoreTurns<kTurns>& turns,
                                               IssuePv issue_prev_pv, KRead k_read,
                                               PvRead pv_read) {
  constexpr int NT = BN / 8;
  const int64_t n0 = nb * BN;
  float s[NT][4];
  wgmma_fence_operands(s);
  turns.wait();
  wgmma_fence();
  wgmma_abt<T, kD, QL, KL>(s, sQw, sKs);
  wgmma_commit();
  // The turn is passed in each branch: with the two branches split around it, the accumulators
  // of the products in flight would cross a join in the control flow, and ptxas serialises the
  // wgmma pipeline there (C7514).
  const bool prev = kOverlap && nb > w.nb_lo;
  if (prev) {
    issue_prev_pv();
    turns.pass(nb);
    wgmma_wait<1>();  // S only: the softmax runs while O += P V does
  } else {
    turns.pass(nb);
    wgmma_wait<0>();
  }
  k_read();
  wgmma_fence_operands(s);
  float alpha[2];
  fwd_softmax_tile<kDropout>(p, s, alpha, fr, w.b, w.h, n0, !full_tile<BM, BN>(p, w.m0, n0),
                            seed);
  if constexpr (kOverlap) {
    wgmma_wait<0>();  // O and the previous P's registers are free, V_{nb-1} read
    wgmma_fence_operands(fr.o);
    if (prev) pv_read();
  }
  fr.rescale(alpha);
#pragma unroll
  for (int kk = 0; kk < PS; ++kk) a_fragment<T>(s, kk, pa[kk]);
}

// The forward on Hopper (sm_90a): warpgroups of four warps and 64 query rows, two per CTA from
// head dim 96 up sharing the K/V stages (Tiles::fwd_groups), else one. Per warpgroup, S = Q K^T
// as wgmma m64nBNk16 with Q and K K-major, O += P V as wgmma m64n64k16 / m64n32k16 over the
// head dim with P from registers and V MN-major, all read from shared memory in the
// core-matrix layout (core_offset), so no ldmatrix is issued.
//
// With two warpgroups (kOverlap) the softmax of key tile j runs while the tensor cores compute
// O += P_{j-1} V_{j-1} (FA3's intra-warpgroup overlap): iteration j issues S_j = Q K_j^T and
// then O += P_{j-1} V_{j-1}, waits for S_j only, forms P_j and the rescale factor alpha_j, and
// applies alpha_j to O once the second product is done (O then holds the sum up to tile j - 1
// relative to tile j's max; the last tile's product follows the loop). K and V then have rings
// of their own, because tile j needs K_j and V_{j-1} at once: iteration j starts the copies of
// K_{j+1} and V_j into the stages that K_{j-1} and V_{j-2} left, and the next iteration waits
// for them. Why only there: the two warpgroups of a CTA meet at a barrier every key tile and an
// SM holds one such CTA, so nothing else fills the tensor cores during their softmax; with one
// warpgroup a CTA, an SM holds three or four CTAs whose softmax and products interleave anyway,
// and the overlap's live registers (P_{j-1} beside S_j: 154 / 184 registers at head dims 32 /
// 64 against 122 / 158, by ptxas) would cost it one of them. Without kOverlap each product is
// waited for before its result is used, K and V sharing the stages of next_kv_tile.
template <typename T, int kD>
__device__ __forceinline__ void fwd_wgmma(const AttnParams& p) {
  using Cfg = Tiles<kD>;
  constexpr int BM = Cfg::template fwd_m<true>, BN = Cfg::kFwdN;
  constexpr int THREADS = Cfg::template fwd_threads<true>;
  constexpr int DT = Cfg::kFwdDT, PS = Cfg::kFwdPS;
  constexpr bool kOverlap = Cfg::template fwd_groups<true> == 2;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);  // BM x kD core matrices (the epilogue: rows of kLds)
  T* sK = sQ + BM * Cfg::kLds;         // 2 x BN x kD: K_j in stage (j - nb_lo) % 2
  T* sV = sK + 2 * BN * kD;            // 2 x BN x kD: V_j likewise

  const FwdTile<T, BM, BN> w(p);
  const int64_t m0 = w.m0, h = w.h, b = w.b;
  const T* sQw = sQ + core_offset<kD>(64 * (threadIdx.x / 128), 0);  // this warpgroup's rows

  load_tile<T, BM, kD, THREADS, true>(sQ, w.qb, p.sq[2], m0, p.L, p.d_load);
  if (w.nb_lo < w.nb_hi) {
    load_tile<T, BN, kD, THREADS, true>(sK, w.kb, p.sk[2], w.nb_lo * BN, p.S, p.d_load);
    if constexpr (!kOverlap) {
      load_tile<T, BN, kD, THREADS, true>(sV, w.vb, p.sv[2], w.nb_lo * BN, p.S, p.dv_load);
    }
  }
  cp_async_commit();

  const uint64_t seed = p.dropout ? seed_of(p) : 0;
  FwdRows<DT> fr(m0);
  uint32_t pa[PS][4];  // P as A operands (kOverlap: the previous key tile's, in flight)
  // Issues O += P V (pa, the V stage at sVs) as one wgmma group; o and pa were last written by
  // the threads, so the fence orders them before the MMA.
  auto issue_pv = [&](const T* sVs) {
    wgmma_fence_operands(fr.o);
    wgmma_fence();
    wgmma_pb<T, kD>(fr.o, pa, sVs);
    wgmma_commit();
  };

  for (int64_t nb = w.nb_lo; nb < w.nb_hi; ++nb) {
    const int st = static_cast<int>((nb - w.nb_lo) & 1);
    if constexpr (kOverlap) {
      cp_async_wait<0>();  // K_nb and V_{nb-1}
      fence_proxy_async();
      __syncthreads();  // and every warpgroup is done with K_{nb-1} and V_{nb-2}
      if (nb + 1 < w.nb_hi) {
        load_tile<T, BN, kD, THREADS, true>(sK + (st ^ 1) * BN * kD, w.kb, p.sk[2],
                                            (nb + 1) * BN, p.S, p.d_load);
      }
      load_tile<T, BN, kD, THREADS, true>(sV + st * BN * kD, w.vb, p.sv[2], nb * BN, p.S,
                                          p.dv_load);
      cp_async_commit();
    } else {
      next_kv_tile<T, BN, kD, THREADS, true>(sK, sV, w.kb, w.vb, p, nb, w.nb_hi, st);
    }
    // S = Q K^T: this warpgroup's 64 rows x BN keys (kOverlap: then O += P_{nb-1} V_{nb-1}).
    // The stages are released by the __syncthreads of the next iteration, or below.
    fwd_wgmma_step<T, kD, kOverlap, true, CoreLayout<kD>, CoreLayout<kD>>(
        p, w, fr, pa, sQw, sK + st * BN * kD, nb, seed, TensorCoreTurns<false>{false, 0, 0},
        [&] { issue_pv(sV + (st ^ 1) * BN * kD); }, [] {}, [] {});
    if constexpr (!kOverlap) {
      issue_pv(sV + st * BN * kD);
      wgmma_wait<0>();
      wgmma_fence_operands(fr.o);
      __syncthreads();  // every warp is done with this stage before it is refilled
    }
  }
  cp_async_wait<0>();  // kOverlap: the last V; with no key tile, the Q copy
  fence_proxy_async();
  __syncthreads();
  if (kOverlap && w.nb_lo < w.nb_hi) {  // O += P V of the last key tile
    issue_pv(sV + ((w.nb_hi - 1 - w.nb_lo) & 1) * BN * kD);
    wgmma_wait<0>();
    wgmma_fence_operands(fr.o);
  }
  // Every S = Q K^T has completed before the barrier above, so sQ is free for the output rows.
  fwd_epilogue<T, kD>(p, fr, m0, b, h, sQ);
}

// The forward kernel: fwd_mma (sm_80 and newer) or, kWgmma, fwd_wgmma (Hopper, sm_90a).
template <typename T, int kD, bool kWgmma>
__global__ void __launch_bounds__(kWgmma && kD >= 96 ? 256 : 128)
    attention_fwd_kernel(const AttnParams p) {
  static_assert(Tiles<kD>::template fwd_threads<kWgmma> == (kWgmma && kD >= 96 ? 256 : 128),
                "__launch_bounds__ above");
  if constexpr (kWgmma) {
    fwd_wgmma<T, kD>(p);
  } else {
    fwd_mma<T, kD>(p);
  }
}

// The start of a warp-specialised Hopper kernel (fwd_tma, dq_tma, dkdv_tma): the producer's
// first thread (`producer`) fetches the tensor maps while thread 0 sets up the mbarriers (init)
// and every thread has zeroed its share of the tiles' unloaded columns (tma_zero_tail), then
// the fence that shows those zeros to wgmma and the one barrier of the whole CTA: the producer
// warpgroup leaves after it.
template <class Init, class... Maps>
__device__ __forceinline__ void tma_cta_start(int producer, Init init, const Maps*... maps) {
  if (threadIdx.x == producer) (tma_prefetch_map(maps), ...);
  if (threadIdx.x == 0) {
    init();
    mbar_init_fence();
  }
  fence_proxy_async();
  __syncthreads();
}

// A consumer warp's arrival on an "empty" mbarrier once its wgmma_wait has completed its reads
// of the stage: its first lane tells the producer, after the whole warp.
__device__ __forceinline__ void warp_release(uint64_t* bar) {
  __syncwarp();
  if (threadIdx.x % 32 == 0) mbar_arrive(bar);
}

// The TMA kernels' shared memory from its first 1024-byte boundary on (Tiles::kSwizzleSlack
// bytes are launched for the step): their tiles are carved from there in multiples of 1024
// bytes, so each starts where its swizzle pattern does (SwizzleLayout), which the launch
// promises nothing about.
__device__ __forceinline__ unsigned char* swizzle_base(unsigned char* smem) {
  return smem + (1024 - smem_addr(smem) % 1024) % 1024;
}

// The bytes TMA writes into a ROWS x kD tile (SwizzleLayout) of `width` loaded columns: its
// column blocks that hold a column below the width. The blocks past it, which a box would read
// wholly outside the tensor, are not loaded (tma_load_tile) but zeroed once (tma_zero_tail).
template <int ROWS, int kD>
__device__ __forceinline__ uint32_t tma_tile_bytes(int width) {
  constexpr int C = SwizzleLayout<ROWS, kD>::kCols;
  return static_cast<uint32_t>(min(kD, (width + C - 1) / C * C) * ROWS * 2);
}

// A ROWS x kD tile of `width` loaded columns from row `row` of head h, batch b into `dst`
// (SwizzleLayout<ROWS, kD>), by the producer's thread: one TMA box per column block below the
// width, each completing its bytes on `bar` (tma_tile_bytes in all).
template <int ROWS, int kD, typename T>
__device__ __forceinline__ void tma_load_tile(T* dst, const CUtensorMap* map, uint64_t* bar,
                                              int width, int row, int h, int b) {
  using L = SwizzleLayout<ROWS, kD>;
  static_assert(ROWS * L::kSpan % 1024 == 0, "each column block on its pattern's boundary");
#pragma unroll
  for (int c = 0; c < kD; c += L::kCols) {
    if (c < width) tma_load(dst + L::offset(0, c), map, bar, c, row, h, b, 0);
  }
}

// Zeroes the column blocks of a ROWS x kD tile (SwizzleLayout) that TMA never loads (those past
// `width`, tma_tile_bytes): a contiguous tail, the blocks being outermost. By every thread of
// the CTA at its start, before the fence that hands the zeros to wgmma's async proxy and the
// CTA's barrier (tma_cta_start); the zeros leave dot products unchanged, as load_tile's.
template <int ROWS, int kD, typename T>
__device__ __forceinline__ void tma_zero_tail(T* tile, int width) {
  const int from = static_cast<int>(tma_tile_bytes<ROWS, kD>(width) / 16);
  uint4 zero;
  zero.x = zero.y = zero.z = zero.w = 0;
  for (int i = from + static_cast<int>(threadIdx.x); i < ROWS * kD * 2 / 16;
       i += static_cast<int>(blockDim.x)) {
    reinterpret_cast<uint4*>(tile)[i] = zero;
  }
}

// The Hopper forward with TMA and warp specialisation (head dims 64 up, Tiles::kFwdTma; picked
// by the launch logic where the inputs suit a tensor map, tile_box): fwd_wgmma's two consumer
// warpgroups (128 query rows, the softmax of key tile j beside O += P_{j-1} V_{j-1}) and a
// producer warpgroup, whose first thread issues every load as a TMA box (the Q tile, then K_j
// and V_j into stage j % 2 of their rings) and goes. Each stage has a "full" mbarrier (the
// producer's arrival with the box's bytes; complete when they have landed) and an "empty" one
// (one arrival per consumer warp once its wgmma has read the stage), so no thread of the CTA waits
// at a __syncthreads per key tile: a warpgroup waits only for the tile it needs, and K_{j+2}
// loads as soon as both warpgroups' S_j has read K_j. The tiles are swizzled (wgmma_layout.h:
// SwizzleLayout), a box per column block (tma_load_tile): rows past L or S and columns past
// the loaded width land as zeros, as load_tile's zero fill. At head dims 64 to 128 the two
// consumer warpgroups take turns to issue their products (TensorCoreTurns, as FA3 there). Why a
// whole warpgroup to issue loads from one thread: registers are allocated per SM sub-partition,
// each holding a quarter of the CTA's warps, so one extra warp caps every thread at 168
// registers (ptxas then spills at head dims 128 and 256); a warpgroup can give its registers to
// the consumers (setmaxnreg: 24 and 240 a thread), as FA3 does.
template <typename T, int kD, bool kDropout>
__device__ __forceinline__ void fwd_tma(const TmaFwdParams& tp) {
  const AttnParams& p = tp.p;
  using Cfg = Tiles<kD>;
  constexpr int BM = Cfg::kFwdTmaM, BN = Cfg::template fwd_tma_n<kDropout>;
  constexpr int CONSUMERS = Cfg::kTmaThreads - 128;
  constexpr int DT = Cfg::kFwdDT, PS = BN / 16;
  static_assert(Cfg::kFwdTma && BM == 128 && CONSUMERS == 256, "two consumer warpgroups");
  using QL = SwizzleLayout<BM, kD>;
  using KL = SwizzleLayout<BN, kD>;
  static_assert(BM * Cfg::kLds * sizeof(T) % 1024 == 0 && BN * kD * sizeof(T) % 1024 == 0,
                "every tile on a 1024-byte boundary (swizzle_base)");
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(swizzle_base(smem));  // BM x kD (the epilogue: rows of kLds)
  T* sK = sQ + BM * Cfg::kLds;         // 2 x BN x kD: K_j in stage (j - nb_lo) % 2
  T* sV = sK + 2 * BN * kD;            // 2 x BN x kD: V_j likewise
  uint64_t* full_q = reinterpret_cast<uint64_t*>(sV + 2 * BN * kD);
  uint64_t* full_k = full_q + 1;   // [2]
  uint64_t* full_v = full_q + 3;   // [2]
  uint64_t* empty_k = full_q + 5;  // [2]
  uint64_t* empty_v = full_q + 7;  // [2]

  const FwdTile<T, BM, BN> w(p);
  const int64_t m0 = w.m0, h = w.h, b = w.b;
  tma_zero_tail<BM, kD>(sQ, p.d_load);
  for (int st = 0; st < 2; ++st) {
    tma_zero_tail<BN, kD>(sK + st * BN * kD, p.d_load);
    tma_zero_tail<BN, kD>(sV + st * BN * kD, p.dv_load);
  }
  tma_cta_start(
      CONSUMERS,
      [&] {
        mbar_init(full_q, 1);
        for (int st = 0; st < 2; ++st) {
          mbar_init(full_k + st, 1);
          mbar_init(full_v + st, 1);
          mbar_init(empty_k + st, CONSUMERS / 32);
          mbar_init(empty_v + st, CONSUMERS / 32);
        }
      },
      &tp.q, &tp.k, &tp.v);

  if (threadIdx.x >= CONSUMERS) {
    setmaxnreg_dec<Cfg::kProducerRegs>();
    if (threadIdx.x == CONSUMERS) {
      const int hk = static_cast<int>(h / p.group), bi = static_cast<int>(b);
      mbar_arrive_expect_tx(full_q, tma_tile_bytes<BM, kD>(p.d_load));
      tma_load_tile<BM, kD>(sQ, &tp.q, full_q, p.d_load, static_cast<int>(m0),
                            static_cast<int>(h), bi);
      for (int64_t nb = w.nb_lo; nb < w.nb_hi; ++nb) {
        const int i = static_cast<int>(nb - w.nb_lo), st = i & 1, phase = (i >> 1) & 1;
        const int row = static_cast<int>(nb * BN);
        // A fresh barrier is in phase 0: the first use of a stage waits for "phase 1" and
        // passes; the next waits until every consumer warp released the previous tile.
        mbar_wait(empty_k + st, phase ^ 1);
        mbar_arrive_expect_tx(full_k + st, tma_tile_bytes<BN, kD>(p.d_load));
        tma_load_tile<BN, kD>(sK + st * BN * kD, &tp.k, full_k + st, p.d_load, row, hk, bi);
        mbar_wait(empty_v + st, phase ^ 1);
        mbar_arrive_expect_tx(full_v + st, tma_tile_bytes<BN, kD>(p.dv_load));
        tma_load_tile<BN, kD>(sV + st * BN * kD, &tp.v, full_v + st, p.dv_load, row, hk, bi);
      }
    }
    return;
  }

  setmaxnreg_inc<Cfg::kConsumerRegs>();
  const T* sQw = sQ + QL::offset(64 * (threadIdx.x / 128), 0);  // this warpgroup's rows
  const uint64_t seed = kDropout && p.dropout ? seed_of(p) : 0;
  FwdRows<DT> fr(m0);
  uint32_t pa[PS][4];  // P as A operands: the previous key tile's, in flight
  // O += P V of key tile nb (pa) as one wgmma group, once V_nb has landed.
  auto issue_pv = [&](int64_t nb) {
    const int i = static_cast<int>(nb - w.nb_lo);
    mbar_wait(full_v + (i & 1), (i >> 1) & 1);
    wgmma_fence_operands(fr.o);
    wgmma_fence();
    wgmma_pb<T, kD, KL>(fr.o, pa, sV + (i & 1) * BN * kD);
    wgmma_commit();
  };

  // The CTA's key tiles that none of this warpgroup's rows see (a causal diagonal, a window's
  // edges: all its scores masked, so O and the row sums would not change) are only waited for
  // and released, K and V (dq_tma says why the wait); its own tiles run the pipeline over its
  // own range, and V of the last one is released after that tile's product when a later tile
  // of the CTA refills the stage.
  const WarpgroupTiles<BN> own(p, m0 + 64 * (threadIdx.x / 128));
  FwdTile<T, BM, BN> wo = w;  // the CTA's tile with this warpgroup's key tiles
  wo.nb_lo = own.lo;
  wo.nb_hi = own.hi;
  const TensorCoreTurns<(kD <= 128)> turns{tp.turns, static_cast<int>(threadIdx.x / 128),
                                           w.nb_hi - 1};
  auto pass = [&](int64_t nb) {
    const int i = static_cast<int>(nb - w.nb_lo), st = i & 1;
    turns.wait();  // a turn not taken, so that both warpgroups take one per key tile
    turns.pass(nb);
    mbar_wait(full_k + st, (i >> 1) & 1);
    warp_release(empty_k + st);
    mbar_wait(full_v + st, (i >> 1) & 1);
    warp_release(empty_v + st);
  };

  mbar_wait(full_q, 0);
  if (w.nb_lo < w.nb_hi) turns.first();
  int64_t nb = w.nb_lo;
  for (; nb < w.nb_hi && nb < own.lo; ++nb) pass(nb);
  for (; nb < own.hi; ++nb) {
    const int i = static_cast<int>(nb - w.nb_lo), st = i & 1;
    mbar_wait(full_k + st, (i >> 1) & 1);
    fwd_wgmma_step<T, kD, true, kDropout, QL, KL>(
        p, wo, fr, pa, sQw, sK + st * BN * kD, nb, seed, turns, [&] { issue_pv(nb - 1); },
        [&] { warp_release(empty_k + st); }, [&] { warp_release(empty_v + (st ^ 1)); });
  }
  if (own.lo < own.hi) {  // O += P V of the last key tile
    issue_pv(own.hi - 1);
    wgmma_wait<0>();
    wgmma_fence_operands(fr.o);
    if (own.hi < w.nb_hi) warp_release(empty_v + ((own.hi - 1 - w.nb_lo) & 1));
  }
  for (; nb < w.nb_hi; ++nb) pass(nb);
  // Both warpgroups' S = Q K^T have completed, so sQ is free for the output rows.
  named_barrier_sync(1, CONSUMERS);
  fwd_epilogue<T, kD>(p, fr, m0, b, h, sQ);
}

// kDropout: built to serve dropout, or not (Tiles::fwd_tma_n; run_fwd picks).
template <typename T, int kD, bool kDropout>
__global__ void __launch_bounds__(Tiles<kD>::kTmaThreads, 1)
    attention_fwd_tma_kernel(const __grid_constant__ TmaFwdParams tp) {
  fwd_tma<T, kD, kDropout>(tp);
}

// --- backward ------------------------------------------------------------------------------

// delta = rowsum(dO * O) and lse in base 2 (+inf where the row saw no key), one warp per row.
template <typename T>
__global__ void __launch_bounds__(256) attention_bwd_prep_kernel(const AttnParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.B * p.Hq * p.L) return;  // whole warps: a warp owns one row
  const int64_t i = row % p.L, bh = row / p.L, h = bh % p.Hq, b = bh / p.Hq;
  const T* dob = static_cast<const T*>(p.dout) + b * p.sdo[0] + h * p.sdo[1] + i * p.sdo[2];
  const int64_t ob = b * p.soi[0] + h * p.soi[1] + i * p.soi[2];
  float acc = 0.f;
  for (int d = lane; d < p.Dv; d += 32) {
    acc += to_float<T>(dob[d]) * load_as<float>(p.out_in, p.out_dtype, ob + d * p.soi[3]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) {
    p.delta[row] = acc;
    const float l = p.lse_in[row];
    p.lse2[row] = l == -INFINITY ? INFINITY : l * kLog2e;
  }
}

// A dQ warp's two query rows (rows[r]: this thread's rows g and g + 8 of the warp's 16): their
// base-2 lse and delta (rows past L: lse2 +inf, so p = 0).
__device__ __forceinline__ void dq_row_stats(const AttnParams& p, int64_t b, int64_t h,
                                             const int64_t (&rows)[2], float (&lse2)[2],
                                             float (&delta)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool in = rows[r] < p.L;
    lse2[r] = in ? p.lse2[(b * p.Hq + h) * p.L + rows[r]] : INFINITY;
    delta[r] = in ? p.delta[(b * p.Hq + h) * p.L + rows[r]] : 0.f;
  }
}

// dS' = p (dP z / (1 - dropout_p) - delta) (1 - tanh^2) of a dQ warp's rows and key tile n0
// (s: the raw scores, dp: dO V^T, both in the mma.sync / wgmma accumulator layout), into s.
template <int NT>
__device__ __forceinline__ void dq_dscores(const AttnParams& p, float (&s)[NT][4],
                                           const float (&dp)[NT][4], const int64_t (&rows)[2],
                                           const float (&lse2)[2], const float (&delta)[2],
                                           int64_t b, int64_t h, int64_t n0, bool edge,
                                           uint64_t seed) {
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t i = rows[e / 2], j = n0 + nt * 8 + 2 * t + (e & 1);
      float th;
      const float s2 = score2(p, s[nt][e], b, h, i, j, edge, th);
      const float pr = exp2f(s2 - lse2[e / 2]);
      float dpv = dp[nt][e];
      if (p.dropout) {
        dpv = pr != 0.f && i < p.L && j < p.S && keep_at(p, seed, b, h, i, j)
                  ? dpv * p.drop_scale
                  : 0.f;
      }
      float ds = pr * (dpv - delta[e / 2]);
      if (p.softcap) ds *= 1.f - th * th;
      s[nt][e] = ds;
    }
  }
}

// The Hopper dQ kernels' products for one warpgroup and key tile (attention_bwd_dq_kernel's
// kWgmma, dq_tma): S = Q K^T and dP = dO V^T as one group of wgmma chains (the warpgroup's Q and
// dO rows at sQw / sdOw in layout QL, the K and V stage in KL, all K-major), waited for.
template <typename T, int kD, class QL, class KL, int NT>
__device__ __forceinline__ void dq_wgmma_scores(float (&s)[NT][4], float (&dp)[NT][4],
                                                const T* sQw, const T* sdOw, const T* sKs,
                                                const T* sVs) {
  wgmma_fence_operands(s);
  wgmma_fence_operands(dp);
  wgmma_fence();
  wgmma_abt<T, kD, QL, KL>(s, sQw, sKs);
  wgmma_abt<T, kD, QL, KL>(dp, sdOw, sVs);
  wgmma_commit();
  wgmma_wait<0>();
  wgmma_fence_operands(s);
  wgmma_fence_operands(dp);
}

// dQ += dS K for one warpgroup (dS from the accumulators s as the A operand, K MN-major in
// layout KL), waited for.
template <typename T, int kD, class KL, int NT, int DT>
__device__ __forceinline__ void dq_wgmma_accumulate(float (&dq)[DT][4], const float (&s)[NT][4],
                                                    const T* sKs) {
  uint32_t da[NT / 2][4];
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) a_fragment<T>(s, kk, da[kk]);
  wgmma_fence_operands(dq);
  wgmma_fence();
  wgmma_pb<T, kD, KL>(dq, da, sKs);
  wgmma_commit();
  wgmma_wait<0>();
  wgmma_fence_operands(dq);
}

// Writes a dQ warp's 16 rows (scaled) from m0w on: staged in sO (16 rows of pitch kLds that only
// this warp uses), then stored.
template <typename T, int kD, int DT>
__device__ __forceinline__ void dq_store_warp(const AttnParams& p, const float (&dq)[DT][4],
                                              T* sO, int64_t b, int64_t h, int64_t m0w) {
  constexpr int LDS = Tiles<kD>::kLds;
  const int lane = threadIdx.x % 32;
  stage_fragment<T, LDS>(sO, dq, lane >> 2, 0, p.scale);
  __syncwarp();
  const int nrows = static_cast<int>(max(int64_t(0), min(int64_t(16), p.L - m0w)));
  T* out = static_cast<T*>(p.dq) + b * p.sdq[0] + h * p.sdq[1] + m0w * p.sdq[2];
  store_rows<T, LDS>(sO, out, p.sdq[2], p.sdq[3], nrows, p.D, p.dq_vec, lane, 32);
}

// dQ: one CTA of 4 warps per (query tile, head, batch); 16 query rows per warp. Its three
// products, like the forward's, come in two versions: kWgmma false, each warp's mma.sync with
// ldmatrix operands; kWgmma true (Hopper, sm_90a), the four warps as one warpgroup: S = Q K^T
// and dP = dO V^T as one group of wgmma chains (Q, dO, K, V K-major), dQ += dS K with dS from
// registers and K MN-major, all tiles in the core-matrix layout.
template <typename T, int kD, bool kWgmma>
__global__ void __launch_bounds__(128) attention_bwd_dq_kernel(const AttnParams p) {
  using Cfg = Tiles<kD>;
  constexpr int BM = Cfg::kFwdM, BN = Cfg::kFwdN, LDS = Cfg::kLds;
  constexpr int NT = BN / 8, DT = kD / 8, KS = kD / 16, PS = BN / 16;
  constexpr int KV = kWgmma ? kD : LDS;  // elements a K / V row takes in its stage
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);  // BM x LDS (kWgmma: BM x kD core matrices in it)
  T* sdO = sQ + BM * LDS;              // BM x LDS (likewise)
  T* sK = sdO + BM * LDS;              // 2 x BN x KV
  T* sV = sK + 2 * BN * KV;            // 2 x BN x KV

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2;
  const int64_t tiles = (p.L + BM - 1) / BM;
  const int64_t m0 = (tiles - 1 - blockIdx.x) * BM;
  const int64_t h = blockIdx.y, b = blockIdx.z, hk = h / p.group;
  const T* qb = static_cast<const T*>(p.q) + b * p.sq[0] + h * p.sq[1];
  const T* dob = static_cast<const T*>(p.dout) + b * p.sdo[0] + h * p.sdo[1];
  const T* kb = static_cast<const T*>(p.k) + b * p.sk[0] + hk * p.sk[1];
  const T* vb = static_cast<const T*>(p.v) + b * p.sv[0] + hk * p.sv[1];

  int64_t nb_lo, nb_hi;
  visible_key_tiles<BN>(p, m0, min(m0 + BM, p.L) - 1, nb_lo, nb_hi);

  load_tile<T, BM, kD, 128, kWgmma>(sQ, qb, p.sq[2], m0, p.L, p.d_load);
  load_tile<T, BM, kD, 128, kWgmma>(sdO, dob, p.sdo[2], m0, p.L, p.dv_load);
  if (nb_lo < nb_hi) {
    load_tile<T, BN, kD, 128, kWgmma>(sK, kb, p.sk[2], nb_lo * BN, p.S, p.d_load);
    load_tile<T, BN, kD, 128, kWgmma>(sV, vb, p.sv[2], nb_lo * BN, p.S, p.dv_load);
  }
  cp_async_commit();

  const uint64_t seed = p.dropout ? seed_of(p) : 0;
  const int64_t rows[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};
  float lse2[2], delta[2];
  dq_row_stats(p, b, h, rows, lse2, delta);
  float dq[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;

  for (int64_t nb = nb_lo; nb < nb_hi; ++nb) {
    const int st = static_cast<int>((nb - nb_lo) & 1);
    next_kv_tile<T, BN, kD, 128, kWgmma>(sK, sV, kb, vb, p, nb, nb_hi, st);
    const T* sKs = sK + st * BN * KV;
    const T* sVs = sV + st * BN * KV;
    const int64_t n0 = nb * BN;

    // S = Q K^T and dP = dO V^T (both: B operand rows are keys, as K in the forward).
    float s[NT][4], dp[NT][4];
    if constexpr (kWgmma) {
      dq_wgmma_scores<T, kD, CoreLayout<kD>, CoreLayout<kD>>(s, dp, sQ, sdO, sKs, sVs);
    } else {
      const T* sQw = sQ + warp * 16 * LDS;
      const T* sdOw = sdO + warp * 16 * LDS;
#pragma unroll
      for (int i = 0; i < NT; ++i) {
        s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
        dp[i][0] = dp[i][1] = dp[i][2] = dp[i][3] = 0.f;
      }
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        uint32_t a[4], ad[4];
        ldmatrix_x4(a, sQw + (lane % 16) * LDS + ks * 16 + (lane / 16) * 8);
        ldmatrix_x4(ad, sdOw + (lane % 16) * LDS + ks * 16 + (lane / 16) * 8);
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
          const int off = (np * 16 + (lane % 8) + (lane / 16) * 8) * LDS + ks * 16 +
                          ((lane / 8) % 2) * 8;
          uint32_t bb[4];
          ldmatrix_x4(bb, sKs + off);
          mma_16816<T>(s[2 * np], a, bb[0], bb[1]);
          mma_16816<T>(s[2 * np + 1], a, bb[2], bb[3]);
          ldmatrix_x4(bb, sVs + off);
          mma_16816<T>(dp[2 * np], ad, bb[0], bb[1]);
          mma_16816<T>(dp[2 * np + 1], ad, bb[2], bb[3]);
        }
      }
    }

    dq_dscores(p, s, dp, rows, lse2, delta, b, h, n0, !full_tile<BM, BN>(p, m0, n0), seed);

    // dQ += dS K: dS from the accumulators as the A operand; K MN-major (wgmma) or its
    // fragments by ldmatrix.trans.
    if constexpr (kWgmma) {
      dq_wgmma_accumulate<T, kD, CoreLayout<kD>>(dq, s, sKs);
    } else {
#pragma unroll
      for (int kk = 0; kk < PS; ++kk) {
        uint32_t a[4];
        a_fragment<T>(s, kk, a);
#pragma unroll
        for (int dt2 = 0; dt2 < DT / 2; ++dt2) {
          uint32_t bb[4];
          ldmatrix_x4_trans(bb,
                            sKs + (kk * 16 + (lane % 16)) * LDS + dt2 * 16 + (lane / 16) * 8);
          mma_16816<T>(dq[2 * dt2], a, bb[0], bb[1]);
          mma_16816<T>(dq[2 * dt2 + 1], a, bb[2], bb[3]);
        }
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();

  dq_store_warp<T, kD>(p, dq, sQ + warp * 16 * LDS, b, h, m0 + warp * 16);
}

// dQ on Hopper with TMA and warp specialisation (head dims 96 up, Tiles::kTma; picked by the
// launch logic where the inputs suit tensor maps): two consumer warpgroups of 64 query rows each
// (a CTA of 128 rows: the K / V tiles shared, as fwd_tma) and a producer warpgroup whose first
// thread loads the Q and dO tile once and K_j, V_j into stage j % 2 of a two-stage ring, as TMA
// boxes, swizzled. Per key tile each consumer warpgroup runs the products of
// attention_bwd_dq_kernel's kWgmma (dq_wgmma_scores, dq_dscores, dq_wgmma_accumulate) and its
// warps release the stage ("empty") once dQ += dS K has read K; no barrier joins the two
// warpgroups until the end, where Q's rows take the output.
template <typename T, int kD>
__device__ __forceinline__ void dq_tma(const TmaBwdParams& tp) {
  const AttnParams& p = tp.p;
  using Cfg = Tiles<kD>;
  constexpr int BM = Cfg::kDqTmaM, BN = Cfg::kDqTmaN, LDS = Cfg::kLds;
  constexpr int CONSUMERS = Cfg::kTmaThreads - 128;
  constexpr int NT = BN / 8, DT = kD / 8;
  static_assert(Cfg::kTma && BM == 128 && CONSUMERS == 256, "two consumer warpgroups");
  using QL = SwizzleLayout<BM, kD>;
  using KL = SwizzleLayout<BN, kD>;
  constexpr uint32_t kQBytes = BM * kD * sizeof(T), kKvBytes = BN * kD * sizeof(T);
  static_assert(kQBytes % 1024 == 0 && kKvBytes % 1024 == 0,
                "every tile on a 1024-byte boundary (swizzle_base)");
  extern __shared__ __align__(128) unsigned char smem[];
  // At the end dQ's rows (pitch kLds) are staged from sQ on, into sdO's first rows too: both
  // have been read by then.
  static_assert(BM * LDS <= 2 * BM * kD, "dQ's staged rows fit in sQ and sdO");
  T* sQ = reinterpret_cast<T*>(swizzle_base(smem));  // BM x kD
  T* sdO = sQ + BM * kD;               // BM x kD
  T* sK = sdO + BM * kD;               // 2 x BN x kD: K_j in stage (j - nb_lo) % 2
  T* sV = sK + 2 * BN * kD;            // 2 x BN x kD: V_j likewise
  const TmaRing bar(sV + 2 * BN * kD);  // once: Q and dO; the ring: K_j and V_j

  const FwdTile<T, BM, BN> w(p);  // the same query tiles and visible key tiles as the forward
  const int64_t m0 = w.m0, h = w.h, b = w.b;
  tma_zero_tail<BM, kD>(sQ, p.d_load);
  tma_zero_tail<BM, kD>(sdO, p.dv_load);
  for (int st = 0; st < 2; ++st) {
    tma_zero_tail<BN, kD>(sK + st * BN * kD, p.d_load);
    tma_zero_tail<BN, kD>(sV + st * BN * kD, p.dv_load);
  }
  tma_cta_start(CONSUMERS, [&] { bar.init(CONSUMERS / 32); }, &tp.q, &tp.dout, &tp.k, &tp.v);

  if (threadIdx.x >= CONSUMERS) {
    setmaxnreg_dec<Cfg::kProducerRegs>();
    if (threadIdx.x == CONSUMERS) {
      const int hk = static_cast<int>(h / p.group), bi = static_cast<int>(b);
      const int r = static_cast<int>(m0), hi = static_cast<int>(h);
      mbar_arrive_expect_tx(bar.once, tma_tile_bytes<BM, kD>(p.d_load) +
                                          tma_tile_bytes<BM, kD>(p.dv_load));
      tma_load_tile<BM, kD>(sQ, &tp.q, bar.once, p.d_load, r, hi, bi);
      tma_load_tile<BM, kD>(sdO, &tp.dout, bar.once, p.dv_load, r, hi, bi);
      for (int64_t nb = w.nb_lo; nb < w.nb_hi; ++nb) {
        const int i = static_cast<int>(nb - w.nb_lo), st = i & 1, phase = (i >> 1) & 1;
        const int row = static_cast<int>(nb * BN);
        mbar_wait(bar.empty + st, phase ^ 1);  // a fresh barrier passes (fwd_tma)
        mbar_arrive_expect_tx(bar.full + st, tma_tile_bytes<BN, kD>(p.d_load) +
                                                 tma_tile_bytes<BN, kD>(p.dv_load));
        tma_load_tile<BN, kD>(sK + st * BN * kD, &tp.k, bar.full + st, p.d_load, row, hk, bi);
        tma_load_tile<BN, kD>(sV + st * BN * kD, &tp.v, bar.full + st, p.dv_load, row, hk, bi);
      }
    }
    return;
  }

  setmaxnreg_inc<Cfg::kConsumerRegs>();
  const int warp = threadIdx.x / 32, wg = threadIdx.x / 128;
  const int64_t m0w = m0 + 64 * wg;  // this warpgroup's rows
  const T* sQw = sQ + QL::offset(64 * wg, 0);
  const T* sdOw = sdO + QL::offset(64 * wg, 0);
  const uint64_t seed = p.dropout ? seed_of(p) : 0;
  const int64_t rows[2] = {m0 + warp * 16 + (threadIdx.x % 32) / 4,
                           m0 + warp * 16 + (threadIdx.x % 32) / 4 + 8};
  float lse2[2], delta[2];
  dq_row_stats(p, b, h, rows, lse2, delta);
  float dq[DT][4];
#pragma unroll
  for (int i = 0; i < DT; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;

  // The CTA's key tiles that none of this warpgroup's rows see (its scores there all masked:
  // dS = 0) are only waited for and released: a release without the wait could count toward
  // the stage's previous phase while the other warpgroup still reads it.
  const WarpgroupTiles<BN> own(p, m0w);
  mbar_wait(bar.once, 0);
  for (int64_t nb = w.nb_lo; nb < w.nb_hi; ++nb) {
    const int i = static_cast<int>(nb - w.nb_lo), st = i & 1;
    const T* sKs = sK + st * BN * kD;
    const int64_t n0 = nb * BN;
    mbar_wait(bar.full + st, (i >> 1) & 1);
    if (own.has(nb)) {
      float s[NT][4], dp[NT][4];
      dq_wgmma_scores<T, kD, QL, KL>(s, dp, sQw, sdOw, sKs, sV + st * BN * kD);
      dq_dscores(p, s, dp, rows, lse2, delta, b, h, n0, !full_tile<64, BN>(p, m0w, n0), seed);
      dq_wgmma_accumulate<T, kD, KL>(dq, s, sKs);
    }
    warp_release(bar.empty + st);  // this warp's products have read K_nb and V_nb
  }
  // Every load has landed; Q's rows take the output once both warpgroups' products are done.
  named_barrier_sync(1, CONSUMERS);
  dq_store_warp<T, kD>(p, dq, sQ + warp * 16 * LDS, b, h, m0 + warp * 16);
}

template <typename T, int kD>
__global__ void __launch_bounds__(Tiles<kD>::kTmaThreads, 1)
    attention_bwd_dq_tma_kernel(const __grid_constant__ TmaBwdParams tp) {
  dq_tma<T, kD>(tp);
}

// Where a dK/dV CTA works: its key tile [n0, n0 + BN), K/V head and batch, and the query tiles
// (BM rows) whose rows see some of its keys, in every query head of the group: iteration `it`
// covers head head(it), rows row0(it) .. row0(it) + BM.
template <typename T, int BN, int BM>
struct KvTile {
  int64_t n0, hk, b, group, mb_lo, nmb, iters;
  const T *kb, *vb;

  __device__ __forceinline__ explicit KvTile(const AttnParams& p) {
    n0 = static_cast<int64_t>(blockIdx.x) * BN;
    hk = blockIdx.y;
    b = blockIdx.z;
    group = p.group;
    kb = static_cast<const T*>(p.k) + b * p.sk[0] + hk * p.sk[1];
    vb = static_cast<const T*>(p.v) + b * p.sv[0] + hk * p.sv[1];
    // Query rows that see some key of [n0, n_last]: j - offset - right <= i <= j - offset + left.
    const int64_t n_last = min(n0 + BN, p.S) - 1;
    const int64_t qlo = p.has_right ? max(int64_t(0), n0 - p.offset - p.right) : 0;
    const int64_t qhi = p.has_left ? min(p.L, n_last - p.offset + p.left + 1) : p.L;
    mb_lo = qlo / BM;
    nmb = qhi > qlo ? (qhi + BM - 1) / BM - mb_lo : 0;
    iters = group * nmb;
  }
  __device__ __forceinline__ int64_t head(int64_t it) const { return hk * group + it / nmb; }
  __device__ __forceinline__ int64_t row0(int64_t it) const { return (mb_lo + it % nmb) * BM; }
};

// Rows [m0, m0 + BM) of (b, h)'s lse2 and delta into sL / sDl, rows past L as lse2 +inf and delta
// 0 (their probabilities recompute as 0); row `first` and every `step`-th after it by this
// thread.
template <int BM>
__device__ __forceinline__ void q_stage_rows(const AttnParams& p, int64_t b, int64_t h, int64_t m0,
                                             float* sL, float* sDl, int first, int step) {
  for (int idx = first; idx < BM; idx += step) {
    const int64_t i = m0 + idx, at = (b * p.Hq + h) * p.L + i;
    sL[idx] = i < p.L ? p.lse2[at] : INFINITY;
    sDl[idx] = i < p.L ? p.delta[at] : 0.f;
  }
}

// Starts the copies of iteration `it`'s Q and dO tiles (BM rows, the layout of load_tile's
// kCore) into sQ / sdO, and stores its rows' lse2 and delta in sL / sDl (rows past L get lse2
// +inf, so their probabilities recompute as 0). THREADS threads; the caller commits.
template <typename T, int BN, int BM, int kD, int THREADS, bool kCore>
__device__ __forceinline__ void load_q_stage(const AttnParams& p, const KvTile<T, BN, BM>& w,
                                             int64_t it, T* sQ, T* sdO, float* sL, float* sDl) {
  const int64_t h = w.head(it), m0 = w.row0(it);
  load_tile<T, BM, kD, THREADS, kCore>(
      sQ, static_cast<const T*>(p.q) + w.b * p.sq[0] + h * p.sq[1], p.sq[2], m0, p.L, p.d_load);
  load_tile<T, BM, kD, THREADS, kCore>(
      sdO, static_cast<const T*>(p.dout) + w.b * p.sdo[0] + h * p.sdo[1], p.sdo[2], m0, p.L,
      p.dv_load);
  q_stage_rows<BM>(p, w.b, h, m0, sL, sDl, threadIdx.x, THREADS);
}

// dK, dV (sm_80 and newer): one CTA of 8 warps per (key tile, key/value head, batch), looping
// over the query tiles of each query head of the group. Phase A: warp w computes S^T and dP^T
// for keys 16 (w % 4) .. + 16 and query columns (w / 4) BM/2 .. + BM/2 and stages P^T, dS'^T in
// shared memory; phase B: warp w accumulates dV, dK for the same 16 keys and head-dim columns
// (w / 4) kD/2 .. + kD/2 over the whole query tile.
template <typename T, int kD>
__device__ __forceinline__ void dkdv_mma(const AttnParams& p) {
  using Cfg = Tiles<kD>;
  constexpr int BN = Cfg::kKvN, BM = Cfg::kKvM, LDS = Cfg::kLds, LDP = Cfg::kLdp;
  constexpr int KS = kD / 16;       // k-steps of K Q^T and V dO^T
  constexpr int QT = BM / 2 / 8;    // n-tiles (query columns) per warp in phase A
  constexpr int HT = kD / 2 / 8;    // n-tiles (head-dim columns) per warp in phase B
  constexpr int MS = BM / 16;       // k-steps (queries) of phase B
  static_assert(QT % 2 == 0 && HT % 2 == 0, "ldmatrix.x4 loads n-tiles in pairs");
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);  // BN x LDS
  T* sV = sK + BN * LDS;               // BN x LDS
  T* sQ = sV + BN * LDS;               // 2 x BM x LDS
  T* sdO = sQ + 2 * BM * LDS;          // 2 x BM x LDS
  T* sP = sdO + 2 * BM * LDS;          // BN x LDP: P^T (dropped, rescaled)
  T* sdS = sP + BN * LDP;              // BN x LDP: dS'^T
  float* sL = reinterpret_cast<float*>(sdS + BN * LDP);  // 2 x BM: lse2
  float* sDl = sL + 2 * BM;                              // 2 x BM: delta

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const KvTile<T, BN, BM> w(p);
  const int64_t n0 = w.n0, hk = w.hk, b = w.b, iters = w.iters;
  auto load_stage = [&](int st, int64_t it) {
    load_q_stage<T, BN, BM, kD, 256, false>(p, w, it, sQ + st * BM * LDS, sdO + st * BM * LDS,
                                            sL + st * BM, sDl + st * BM);
  };

  load_tile<T, BN, kD, 256>(sK, w.kb, p.sk[2], n0, p.S, p.d_load);
  load_tile<T, BN, kD, 256>(sV, w.vb, p.sv[2], n0, p.S, p.dv_load);
  if (iters > 0) load_stage(0, 0);
  cp_async_commit();

  const uint64_t seed = p.dropout ? seed_of(p) : 0;
  const int kw = (warp % 4) * 16;       // this warp's keys (both phases)
  const int qw = (warp / 4) * (BM / 2);  // phase A: query columns
  const int dh = (warp / 4) * (kD / 2);  // phase B: head-dim columns
  float dk[HT][4], dv[HT][4];
#pragma unroll
  for (int i = 0; i < HT; ++i) {
    dk[i][0] = dk[i][1] = dk[i][2] = dk[i][3] = 0.f;
    dv[i][0] = dv[i][1] = dv[i][2] = dv[i][3] = 0.f;
  }

  for (int64_t it = 0; it < iters; ++it) {
    const int st = static_cast<int>(it & 1);
    if (it + 1 < iters) {
      load_stage(st ^ 1, it + 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int64_t h = w.head(it), m0 = w.row0(it);
    const T* sQs = sQ + st * BM * LDS;
    const T* sdOs = sdO + st * BM * LDS;
    const float* sLs = sL + st * BM;
    const float* sDls = sDl + st * BM;

    // Phase A: S^T = K Q^T and dP^T = V dO^T (16 keys x BM/2 queries per warp).
    float s[QT][4], dp[QT][4];
#pragma unroll
    for (int i = 0; i < QT; ++i) {
      s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
      dp[i][0] = dp[i][1] = dp[i][2] = dp[i][3] = 0.f;
    }
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      uint32_t a[4], av[4];
      ldmatrix_x4(a, sK + (kw + (lane % 16)) * LDS + ks * 16 + (lane / 16) * 8);
      ldmatrix_x4(av, sV + (kw + (lane % 16)) * LDS + ks * 16 + (lane / 16) * 8);
#pragma unroll
      for (int np = 0; np < QT / 2; ++np) {
        const int off = (qw + np * 16 + (lane % 8) + (lane / 16) * 8) * LDS + ks * 16 +
                        ((lane / 8) % 2) * 8;
        uint32_t bb[4];
        ldmatrix_x4(bb, sQs + off);
        mma_16816<T>(s[2 * np], a, bb[0], bb[1]);
        mma_16816<T>(s[2 * np + 1], a, bb[2], bb[3]);
        ldmatrix_x4(bb, sdOs + off);
        mma_16816<T>(dp[2 * np], av, bb[0], bb[1]);
        mma_16816<T>(dp[2 * np + 1], av, bb[2], bb[3]);
      }
    }

    // s[qt][e]: key n0 + kw + g + 8 (e / 2), query column qw + qt * 8 + 2t + e % 2.
    const bool edge = !full_tile<BM, BN>(p, m0, n0);
#pragma unroll
    for (int qt = 0; qt < QT; ++qt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = qw + qt * 8 + 2 * t + (e & 1);
        const int64_t i = m0 + col, j = n0 + kw + g + 8 * (e / 2);
        float th;
        const float s2 = score2(p, s[qt][e], b, h, i, j, edge, th);
        const float pr = exp2f(s2 - sLs[col]);
        float pd = pr, dpv = dp[qt][e];
        if (p.dropout) {
          const bool keep = pr != 0.f && i < p.L && j < p.S && keep_at(p, seed, b, h, i, j);
          pd = keep ? pr * p.drop_scale : 0.f;
          dpv = keep ? dpv * p.drop_scale : 0.f;
        }
        float ds = pr * (dpv - sDls[col]);
        if (p.dmask != nullptr && i < p.L && j < p.S) {
          p.dmask[((b * p.Hq + h) * p.L + i) * p.S + j] = ds;
        }
        if (p.softcap) ds *= 1.f - th * th;
        s[qt][e] = pd;
        dp[qt][e] = ds;
      }
      // Stage P^T and dS'^T as 16-bit row-major tiles (rows keys, columns queries).
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int at = (kw + g + 8 * r) * LDP + qw + qt * 8 + 2 * t;
        *reinterpret_cast<uint32_t*>(sP + at) = pack2<T>(s[qt][2 * r], s[qt][2 * r + 1]);
        *reinterpret_cast<uint32_t*>(sdS + at) = pack2<T>(dp[qt][2 * r], dp[qt][2 * r + 1]);
      }
    }
    __syncthreads();

    // Phase B: dV += P^T dO and dK += dS'^T Q over the whole query tile.
#pragma unroll
    for (int kk = 0; kk < MS; ++kk) {
      uint32_t ap[4], ads[4];
      ldmatrix_x4(ap, sP + (kw + (lane % 16)) * LDP + kk * 16 + (lane / 16) * 8);
      ldmatrix_x4(ads, sdS + (kw + (lane % 16)) * LDP + kk * 16 + (lane / 16) * 8);
#pragma unroll
      for (int np = 0; np < HT / 2; ++np) {
        const int off = (kk * 16 + (lane % 16)) * LDS + dh + np * 16 + (lane / 16) * 8;
        uint32_t bb[4];
        ldmatrix_x4_trans(bb, sdOs + off);
        mma_16816<T>(dv[2 * np], ap, bb[0], bb[1]);
        mma_16816<T>(dv[2 * np + 1], ap, bb[2], bb[3]);
        ldmatrix_x4_trans(bb, sQs + off);
        mma_16816<T>(dk[2 * np], ads, bb[0], bb[1]);
        mma_16816<T>(dk[2 * np + 1], ads, bb[2], bb[3]);
      }
    }
    __syncthreads();  // P^T, dS'^T and this Q/dO stage are free again
  }
  cp_async_wait<0>();
  __syncthreads();

  // Stage dK (scaled) and dV in sK / sV, then store the keys < S.
  stage_fragment<T, LDS>(sK, dk, kw + g, dh, p.scale);
  stage_fragment<T, LDS>(sV, dv, kw + g, dh, 1.f);
  __syncthreads();
  const int nrows = static_cast<int>(min(int64_t(BN), p.S - n0));
  store_rows<T, LDS>(sK, static_cast<T*>(p.dk) + b * p.sdk[0] + hk * p.sdk[1] + n0 * p.sdk[2],
                     p.sdk[2], p.sdk[3], nrows, p.D, p.dk_vec, threadIdx.x, 256);
  store_rows<T, LDS>(sV, static_cast<T*>(p.dv) + b * p.sdv[0] + hk * p.sdv[1] + n0 * p.sdv[2],
                     p.sdv[2], p.sdv[3], nrows, p.Dv, p.dv_vec, threadIdx.x, 256);
}

// One query tile `it` of the Hopper dK/dV kernels (dkdv_wgmma, dkdv_tma), for this thread's
// warpgroup: S^T = K Q^T (warpgroup 0) or dP^T = V dO^T (warpgroup 1), then warpgroup 0 forms
// P^T and hands P (and 1 - tanh^2) to warpgroup 1 through sP / sCap, handover() being the
// barrier of both warpgroups between the two, warpgroup 1 forms dS'^T, and each accumulates its
// product: dV += P^T dO or dK += dS'^T Q. K and V (64 rows, layout KL) and the stage's Q and dO
// (BM rows, layout QL) are read K-major by the first product, Q and dO MN-major by the second;
// sLs / sDls hold the stage's lse2 and delta. Returns once this warpgroup's products are complete
// (the stage's tiles read).
template <typename T, int kD, class KL, class QL, int BN, int BM, int DT, class Handover>
__device__ __forceinline__ void dkdv_wgmma_step(const AttnParams& p, const KvTile<T, BN, BM>& w,
                                                float (&acc)[DT][4], int64_t it, const T* sK,
                                                const T* sV, const T* sQs, const T* sdOs,
                                                const float* sLs, const float* sDls, float* sP,
                                                float* sCap, uint64_t seed, Handover handover) {
  constexpr int QT = BM / 8;   // n-tiles (query columns) of S^T and dP^T
  constexpr int MS = BM / 16;  // k-steps (queries) of dV += P^T dO and dK += dS'^T Q
  const int wg = (threadIdx.x / 128) & 1, tid = threadIdx.x % 128;
  const int g = (tid % 32) >> 2, t = tid & 3;
  const int kw = (tid / 32) * 16;  // this warp's keys (rows of the wgmma M)
  const int64_t n0 = w.n0, b = w.b, h = w.head(it), m0 = w.row0(it);

  // S^T = K Q^T (warpgroup 0) or dP^T = V dO^T (warpgroup 1): 64 keys x BM queries. The
  // operands are chosen by address, so both warpgroups issue the same instructions.
  float s[QT][4];
  wgmma_fence_operands(s);
  wgmma_fence();
  wgmma_abt<T, kD, KL, QL>(s, wg == 0 ? sK : sV, wg == 0 ? sQs : sdOs);
  wgmma_commit();
  wgmma_wait<0>();
  wgmma_fence_operands(s);

  // s[qt][e]: key n0 + kw + g + 8 (e / 2), query column qt * 8 + 2t + e % 2.
  const bool edge = !full_tile<BM, BN>(p, m0, n0);
  if (wg == 0) {  // P^T (dropped, rescaled) into s; P and 1 - tanh^2 handed over
#pragma unroll
    for (int qt = 0; qt < QT; ++qt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = qt * 8 + 2 * t + (e & 1);
        const int64_t i = m0 + col, j = n0 + kw + g + 8 * (e / 2);
        float th;
        const float pr = exp2f(score2(p, s[qt][e], b, h, i, j, edge, th) - sLs[col]);
        const bool keep =
            !p.dropout || (pr != 0.f && i < p.L && j < p.S && keep_at(p, seed, b, h, i, j));
        sP[(qt * 4 + e) * 128 + tid] = keep ? pr : -pr;
        if (p.softcap) sCap[(qt * 4 + e) * 128 + tid] = 1.f - th * th;
        s[qt][e] = keep ? (p.dropout ? pr * p.drop_scale : pr) : 0.f;
      }
    }
  }
  handover();
  if (wg == 1) {  // dS'^T = P^T (dP^T z / (1 - dropout_p) - delta) (1 - tanh^2) into s
#pragma unroll
    for (int qt = 0; qt < QT; ++qt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = qt * 8 + 2 * t + (e & 1);
        const int64_t i = m0 + col, j = n0 + kw + g + 8 * (e / 2);
        const float x = sP[(qt * 4 + e) * 128 + tid];
        const float pr = fabsf(x);
        float dpv = s[qt][e];
        if (p.dropout) dpv = signbit(x) ? 0.f : dpv * p.drop_scale;
        float ds = pr * (dpv - sDls[col]);
        if (p.dmask != nullptr && i < p.L && j < p.S) {
          p.dmask[((b * p.Hq + h) * p.L + i) * p.S + j] = ds;
        }
        if (p.softcap) ds *= sCap[(qt * 4 + e) * 128 + tid];
        s[qt][e] = ds;
      }
    }
  }

  // dV += P^T dO (warpgroup 0) or dK += dS'^T Q (warpgroup 1): the A operand from the
  // accumulators, dO or Q MN-major.
  uint32_t fa[MS][4];
#pragma unroll
  for (int kk = 0; kk < MS; ++kk) a_fragment<T>(s, kk, fa[kk]);
  wgmma_fence_operands(acc);
  wgmma_fence();
  wgmma_pb<T, kD, QL>(acc, fa, wg == 0 ? sdOs : sQs);
  wgmma_commit();
  wgmma_wait<0>();
  wgmma_fence_operands(acc);
}

// The Hopper dK/dV kernels' end: warpgroup 0's dV and warpgroup 1's dK (scaled), staged as
// 16-bit rows in sVStage / sKStage (free once sync(), a barrier of both warpgroups, has seen
// every product complete), then the keys < S stored.
template <typename T, int kD, int BN, int BM, int DT, class Sync>
__device__ __forceinline__ void dkdv_wgmma_store(const AttnParams& p, const KvTile<T, BN, BM>& w,
                                                 const float (&acc)[DT][4], T* sVStage,
                                                 T* sKStage, Sync sync) {
  constexpr int LDS = Tiles<kD>::kLds;
  const int wg = (threadIdx.x / 128) & 1, tid = threadIdx.x % 128;
  const int64_t n0 = w.n0, hk = w.hk, b = w.b;
  sync();
  T* stage = wg == 0 ? sVStage : sKStage;
  stage_fragment<T, LDS>(stage, acc, (tid / 32) * 16 + ((tid % 32) >> 2), 0,
                         wg == 0 ? 1.f : p.scale);
  sync();
  const int nrows = static_cast<int>(min(int64_t(BN), p.S - n0));
  if (wg == 0) {
    store_rows<T, LDS>(sVStage,
                       static_cast<T*>(p.dv) + b * p.sdv[0] + hk * p.sdv[1] + n0 * p.sdv[2],
                       p.sdv[2], p.sdv[3], nrows, p.Dv, p.dv_vec, tid, 128);
  } else {
    store_rows<T, LDS>(sKStage,
                       static_cast<T*>(p.dk) + b * p.sdk[0] + hk * p.sdk[1] + n0 * p.sdk[2],
                       p.sdk[2], p.sdk[3], nrows, p.D, p.dk_vec, tid, 128);
  }
}

// dK, dV on Hopper (sm_90a): one CTA of two warpgroups per (key tile of 64, key/value head,
// batch), looping over the query tiles as dkdv_mma. The wgmma M of 64 is the key tile, and the
// two warpgroups split the work by product: warpgroup 0 computes S^T = K Q^T, turns it into
// P^T (softmax, softcap, masks, dropout) and accumulates dV += P^T dO; warpgroup 1 computes
// dP^T = V dO^T, takes P from warpgroup 0 through shared memory (fp32, in accumulator order),
// forms dS'^T and accumulates dK += dS'^T Q (dkdv_wgmma_step). Each thread thus holds one 64 x kD
// accumulator (kD / 2 floats: head dim 256 fits), and P^T / dS'^T go from accumulators to A
// operands in registers (a_fragment). K and V (K-major) and the Q / dO ring sit in the
// core-matrix layout; a Q or dO tile is read K-major as B of the first product (rows = queries
// = N) and MN-major as B of the second (rows = queries = K). Two barriers per query tile: the
// stage has landed (the next stage's copies start after it), P is handed over.
template <typename T, int kD>
__device__ __forceinline__ void dkdv_wgmma(const AttnParams& p) {
  using Cfg = Tiles<kD>;
  constexpr int BN = Cfg::kKvN, BM = Cfg::kKvM;
  constexpr int QT = BM / 8;
  constexpr int DT = kD / 8;
  static_assert(BN == 64, "a key tile is one wgmma M");
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);  // BN x kD core matrices
  T* sV = sK + BN * kD;                // BN x kD
  T* sQ = sV + BN * kD;                // 2 x BM x kD
  T* sdO = sQ + 2 * BM * kD;           // 2 x BM x kD
  // P (sign bit set where dropout dropped it) and 1 - tanh^2 (softcap), element e of a
  // thread's accumulators at [e][thread]: the threads of warpgroup 1 read what the threads of
  // the same rank in warpgroup 0 wrote, 32 consecutive floats a warp (no bank conflicts).
  float* sP = reinterpret_cast<float*>(sdO + 2 * BM * kD);  // 4 QT x 128
  float* sCap = sP + BN * BM;                                // 4 QT x 128
  float* sL = sCap + BN * BM;                                // 2 x BM: lse2
  float* sDl = sL + 2 * BM;                                  // 2 x BM: delta
  static_assert(BN * BM == 4 * QT * 128, "one float per accumulator of a warpgroup");

  const KvTile<T, BN, BM> w(p);
  auto load_stage = [&](int st, int64_t it) {
    load_q_stage<T, BN, BM, kD, 256, true>(p, w, it, sQ + st * BM * kD, sdO + st * BM * kD,
                                           sL + st * BM, sDl + st * BM);
  };

  load_tile<T, BN, kD, 256, true>(sK, w.kb, p.sk[2], w.n0, p.S, p.d_load);
  load_tile<T, BN, kD, 256, true>(sV, w.vb, p.sv[2], w.n0, p.S, p.dv_load);
  if (w.iters > 0) load_stage(0, 0);
  cp_async_commit();

  const uint64_t seed = p.dropout ? seed_of(p) : 0;
  float acc[DT][4];  // warpgroup 0: dV; warpgroup 1: dK (unscaled)
#pragma unroll
  for (int i = 0; i < DT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

  for (int64_t it = 0; it < w.iters; ++it) {
    const int st = static_cast<int>(it & 1);
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();  // stage st landed; every thread is done with the other stage and with sP
    if (it + 1 < w.iters) {
      load_stage(st ^ 1, it + 1);
      cp_async_commit();
    }
    dkdv_wgmma_step<T, kD, CoreLayout<kD>, CoreLayout<kD>>(
        p, w, acc, it, sK, sV, sQ + st * BM * kD, sdO + st * BM * kD, sL + st * BM,
        sDl + st * BM, sP, sCap, seed, [] { __syncthreads(); });
  }
  cp_async_wait<0>();
  // Once every wgmma has read its tiles, dV is staged where the ring was, dK where K and V were.
  dkdv_wgmma_store<T, kD>(p, w, acc, sQ, sK, [] { __syncthreads(); });
}

// dK, dV on Hopper with TMA and warp specialisation (head dims 96 up, Tiles::kTma; picked by the
// launch logic where the inputs suit tensor maps): dkdv_wgmma's two warpgroups as consumers and
// a producer warpgroup, as fwd_tma. The producer's first thread loads K and V once and each
// query tile's Q and dO into stage it % 2 of a two-stage ring, as TMA boxes, swizzled;
// its first warp writes the stage's lse2 and delta (rows past L: +inf and 0, as load_q_stage)
// before that thread's arrival on the stage's "full" mbarrier. A consumer warp releases a stage
// ("empty", one arrival per warp) once its last product of the tile has read it. P and 1 - tanh^2
// are double-buffered, so the hand-over is the one barrier of the two consumer warpgroups per
// query tile: warpgroup 0 writes tile it + 1's P only after warpgroup 1 has met it at tile it's
// hand-over, which it does after its reads of tile it - 1's.
template <typename T, int kD>
__device__ __forceinline__ void dkdv_tma(const TmaBwdParams& tp) {
  const AttnParams& p = tp.p;
  using Cfg = Tiles<kD>;
  constexpr int BN = Cfg::kKvN, BM = Cfg::kKvM;
  constexpr int CONSUMERS = Cfg::kTmaThreads - 128;
  constexpr int DT = kD / 8;
  static_assert(Cfg::kTma && BN == 64 && CONSUMERS == 256, "two consumer warpgroups");
  using KL = SwizzleLayout<BN, kD>;
  using QL = SwizzleLayout<BM, kD>;
  constexpr uint32_t kKvBytes = BN * kD * sizeof(T), kQBytes = BM * kD * sizeof(T);
  static_assert(kKvBytes % 1024 == 0 && kQBytes % 1024 == 0,
                "every tile on a 1024-byte boundary (swizzle_base)");
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(swizzle_base(smem));  // BN x kD (the end: dK rows of kLds)
  T* sV = sK + BN * kD;                // BN x kD
  T* sQ = sV + BN * kD;                // 2 x BM x kD (the end: dV rows of kLds)
  T* sdO = sQ + 2 * BM * kD;           // 2 x BM x kD
  float* sP = reinterpret_cast<float*>(sdO + 2 * BM * kD);  // 2 x BN x BM, as dkdv_wgmma's
  float* sCap = sP + 2 * BN * BM;                            // 2 x BN x BM
  float* sL = sCap + 2 * BN * BM;                            // 2 x BM: lse2
  float* sDl = sL + 2 * BM;                                  // 2 x BM: delta
  const TmaRing bar(sDl + 2 * BM);  // once: K and V; the ring: a query tile's Q and dO

  const KvTile<T, BN, BM> w(p);
  tma_zero_tail<BN, kD>(sK, p.d_load);
  tma_zero_tail<BN, kD>(sV, p.dv_load);
  for (int st = 0; st < 2; ++st) {
    tma_zero_tail<BM, kD>(sQ + st * BM * kD, p.d_load);
    tma_zero_tail<BM, kD>(sdO + st * BM * kD, p.dv_load);
  }
  tma_cta_start(CONSUMERS, [&] { bar.init(CONSUMERS / 32); }, &tp.k, &tp.v, &tp.q, &tp.dout);

  if (threadIdx.x >= CONSUMERS) {
    setmaxnreg_dec<Cfg::kProducerRegs>();
    if (threadIdx.x < CONSUMERS + 32) {
      const int lane = threadIdx.x % 32, hk = static_cast<int>(w.hk), bi = static_cast<int>(w.b);
      if (lane == 0 && w.iters > 0) {
        const int row = static_cast<int>(w.n0);
        mbar_arrive_expect_tx(bar.once, tma_tile_bytes<BN, kD>(p.d_load) +
                                            tma_tile_bytes<BN, kD>(p.dv_load));
        tma_load_tile<BN, kD>(sK, &tp.k, bar.once, p.d_load, row, hk, bi);
        tma_load_tile<BN, kD>(sV, &tp.v, bar.once, p.dv_load, row, hk, bi);
      }
      for (int64_t it = 0; it < w.iters; ++it) {
        const int st = static_cast<int>(it & 1), phase = static_cast<int>((it >> 1) & 1);
        const int64_t h = w.head(it), m0 = w.row0(it);
        // A fresh barrier is in phase 0: the first use of a stage passes (fwd_tma).
        mbar_wait(bar.empty + st, phase ^ 1);
        // Q and dO are issued first, so their loads overlap the warp's loads of lse2 and delta;
        // the phase completes with both the copies' bytes and the arrival after the warp's
        // stores of lse2 and delta, which it publishes.
        if (lane == 0) {
          const int r = static_cast<int>(m0), hi = static_cast<int>(h);
          mbar_expect_tx(bar.full + st, tma_tile_bytes<BM, kD>(p.d_load) +
                                            tma_tile_bytes<BM, kD>(p.dv_load));
          tma_load_tile<BM, kD>(sQ + st * BM * kD, &tp.q, bar.full + st, p.d_load, r, hi, bi);
          tma_load_tile<BM, kD>(sdO + st * BM * kD, &tp.dout, bar.full + st, p.dv_load, r, hi,
                                bi);
        }
        q_stage_rows<BM>(p, w.b, h, m0, sL + st * BM, sDl + st * BM, lane, 32);
        __syncwarp();
        if (lane == 0) mbar_arrive(bar.full + st);
      }
    }
    return;
  }

  setmaxnreg_inc<Cfg::kConsumerRegs>();
  const uint64_t seed = p.dropout ? seed_of(p) : 0;
  float acc[DT][4];  // warpgroup 0: dV; warpgroup 1: dK (unscaled)
#pragma unroll
  for (int i = 0; i < DT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  auto consumers_sync = [] { named_barrier_sync(1, CONSUMERS); };

  if (w.iters > 0) mbar_wait(bar.once, 0);
  for (int64_t it = 0; it < w.iters; ++it) {
    const int st = static_cast<int>(it & 1);
    mbar_wait(bar.full + st, static_cast<int>((it >> 1) & 1));
    dkdv_wgmma_step<T, kD, KL, QL>(p, w, acc, it, sK, sV, sQ + st * BM * kD,
                                   sdO + st * BM * kD, sL + st * BM, sDl + st * BM,
                                   sP + st * BN * BM, sCap + st * BN * BM, seed, consumers_sync);
    warp_release(bar.empty + st);  // this warp's products have read the stage (the step's wait)
  }
  // Every load has landed (each was waited for), so the tiles take the outputs once both
  // warpgroups' products are complete.
  dkdv_wgmma_store<T, kD>(p, w, acc, sQ, sK, consumers_sync);
}

template <typename T, int kD>
__global__ void __launch_bounds__(Tiles<kD>::kTmaThreads, 1)
    attention_bwd_dkdv_tma_kernel(const __grid_constant__ TmaBwdParams tp) {
  dkdv_tma<T, kD>(tp);
}

// dK, dV: dkdv_mma (sm_80 and newer) or, kWgmma, dkdv_wgmma (Hopper, sm_90a); 256 threads.
template <typename T, int kD, bool kWgmma>
__global__ void __launch_bounds__(256) attention_bwd_dkdv_kernel(const AttnParams p) {
  if constexpr (kWgmma) {
    dkdv_wgmma<T, kD>(p);
  } else {
    dkdv_mma<T, kD>(p);
  }
}

// --- launchers -----------------------------------------------------------------------------

constexpr int64_t kMaxGridYZ = 65535;

// The tensor core kernels' padded head dim for head dims D, Dv.
inline int padded_head_dim(int64_t D, int64_t Dv) {
  const int64_t d = std::max(D, Dv);
  for (int kd : {32, 64, 96, 128, 192, 256}) {
    if (d <= kd) return kd;
  }
  TORCH_CHECK(false, "native CUDA attention takes head dims up to 256, got ", d);
  return 256;
}

inline bool rows_aligned(const at::Tensor& t) {
  // 16-byte rows: last dim a multiple of 8 elements with unit stride, every other stride (of a
  // dim longer than 1) a multiple of 8 elements, the base 16-byte aligned.
  const int64_t E = t.size(3);
  if (E % 8 != 0 || (E > 1 && t.stride(3) != 1)) return false;
  for (int d = 0; d < 3; ++d) {
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  }
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// `t` itself when the kernels can read it with 16-byte copies, else a copy whose last dim is
// zero-padded to a multiple of 8 (the kernels read the zeros as head-dim padding).
inline at::Tensor kernel_input(const at::Tensor& t) {
  if (rows_aligned(t)) return t;
  const int64_t E = t.size(3), E8 = (E + 7) / 8 * 8;
  at::Tensor buf = at::zeros({t.size(0), t.size(1), t.size(2), E8}, t.options());
  buf.narrow(3, 0, E).copy_(t);
  return buf;
}

inline void strides3(const at::Tensor& t, int64_t* s) {
  for (int d = 0; d < 3; ++d) s[d] = t.size(d) == 1 ? 0 : t.stride(d);
}

inline void strides4(const at::Tensor& t, int64_t* s) {
  for (int d = 0; d < 4; ++d) s[d] = t.size(d) == 1 ? 0 : t.stride(d);
}

// fastattn.reference.attention_output: (B, Hq, L, Dv), laid out (B, L, Hq, Dv) in memory when q
// is (flash-attn's layout), else contiguous.
inline at::Tensor attention_output(const at::Tensor& q, int64_t Dv) {
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2);
  if (H > 1 && L > 1 && q.stride(1) < q.stride(2)) {
    return at::empty({B, L, H, Dv}, q.options()).transpose(1, 2);
  }
  return at::empty({B, H, L, Dv}, q.options());
}

// Checks every argument the forward and backward share (the CPU launcher's checks, plus the
// CUDA path's dtype and size limits) and fills the shape, input and option fields of `p`;
// `keep` holds the tensors the pointers in `p` point into.
inline void check_and_fill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& seed,
                    double dropout_p, double scale, int64_t left, int64_t right,
                    bool align_bottom, double softcap, AttnParams& p,
                    std::vector<at::Tensor>& keep) {
  const c10::Device device = q.device();
  check_float_on(q, "q", device);
  check_float_on(k, "k", device);
  check_float_on(v, "v", device);
  check_attention_args(q, k, v, scale, softcap, left, right, dropout_p);
  TORCH_CHECK_TYPE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                   "native CUDA attention takes float16 or bfloat16 q, k and v (tensor cores), "
                   "got ", q.scalar_type(), "; backend 'triton' (float32) or 'torch' (float32, "
                   "float64) serves ", q.scalar_type(), " on CUDA");
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= 256 && v.size(3) >= 1 && v.size(3) <= 256,
              "native CUDA attention takes head dims from 1 to 256 (q/k: ", q.size(3),
              ", v: ", v.size(3), ")");
  TORCH_CHECK(q.size(0) <= kMaxGridYZ && q.size(1) <= kMaxGridYZ,
              "native CUDA attention takes batch and query heads up to 65535 each (CUDA grid "
              "limit), got batch ", q.size(0), " and ", q.size(1), " heads");
  p = AttnParams{};
  p.B = q.size(0);
  p.Hq = q.size(1);
  p.L = q.size(2);
  p.D = static_cast<int>(q.size(3));
  p.Hk = k.size(1);
  p.S = k.size(2);
  p.Dv = static_cast<int>(v.size(3));
  p.group = p.Hq / p.Hk;
  const at::Tensor qi = kernel_input(q), ki = kernel_input(k), vi = kernel_input(v);
  keep.insert(keep.end(), {qi, ki, vi});
  p.q = qi.data_ptr();
  p.k = ki.data_ptr();
  p.v = vi.data_ptr();
  strides3(qi, p.sq);
  strides3(ki, p.sk);
  strides3(vi, p.sv);
  p.d_load = static_cast<int>(qi.size(3));  // k's padded width is the same (same D)
  p.dv_load = static_cast<int>(vi.size(3));
  p.mask_kind = kAttnNoMask;
  p.mask_dtype = kF32;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    check_device(m, "mask", device);
    TORCH_CHECK(m.scalar_type() == at::kBool || is_kernel_float(m.scalar_type()),
                "mask must be bool or float32/float64/float16/bfloat16, got ", m.scalar_type());
    const std::vector<int64_t> full{p.B, p.Hq, p.L, p.S};
    check_broadcasts(m, full, "mask");
    const at::Tensor view = m.expand(full);
    keep.push_back(view);
    p.mask = view.data_ptr();
    p.mask_dtype = dtype_code(m.scalar_type());
    p.mask_kind = m.scalar_type() == at::kBool ? kAttnBoolMask : kAttnAdditiveMask;
    strides4(view, p.sm);
  }
  p.dropout = dropout_p > 0;
  if (p.dropout) {
    TORCH_CHECK(seed.has_value(), "seed must be given when dropout_p > 0");
    const at::Tensor& s = *seed;
    TORCH_CHECK((s.device().is_cpu() || s.device() == device) && s.scalar_type() == at::kLong &&
                    s.numel() >= 1,
                "seed must be an int64 tensor with at least one element, on the CPU or on ",
                device, ", got ", s.scalar_type(), " of shape ", s.sizes(), " on ", s.device());
    if (s.device().is_cpu()) {
      p.seed = static_cast<uint64_t>(s.reshape(-1)[0].item<int64_t>());
    } else {
      p.seed_ptr = s.data_ptr<int64_t>();  // read by the kernels: no device-to-host sync
      keep.push_back(s);
    }
    p.threshold = dropout_threshold(dropout_p);
  }
  p.drop_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  p.scale = static_cast<float>(scale);
  p.softcap = softcap > 0;
  p.score_scale = static_cast<float>(p.softcap ? scale / softcap : scale * kLog2eD);
  p.cap_log2 = static_cast<float>(softcap * kLog2eD);
  p.has_left = left >= 0;
  p.has_right = right >= 0;
  p.left = left;
  p.right = right;
  p.offset = align_bottom ? p.S - p.L : 0;
}

// Whether an output tensor's rows of `E` elements take 16-byte stores.
inline bool vec_ok(const at::Tensor& t) { return rows_aligned(t); }

// A 5-d tensor map of 16-bit elements, as cuTensorMapEncodeTiled takes it (innermost dim first,
// strides in bytes for dims 1-4, no interleave, out-of-bound elements read as zero): one of
// q, k, v viewed as (columns, rows, heads, batch, 1), its boxes {kCols, box_rows, 1, 1, 1}
// swizzled by `swizzle` bytes, so that the box at column c lands as column block c / kCols of
// a box_rows x kD tile in the kernels' SwizzleLayout (tma_load_tile).
struct TmaBox {
  const void* base;
  uint64_t dims[5];
  uint64_t strides[4];
  uint32_t box[5];
  uint32_t swizzle;  // span in bytes: 32, 64 or 128
};

// The box of `base` (strides s: batch, head, row, in elements; `width` readable columns, a
// multiple of 8) for tiles of box_rows rows; none where a stride a dimension of more than one
// element steps by is not a positive multiple of 16 bytes (a tensor map's rule: such inputs take
// the cp.async kernels), nor for an empty tensor (no keys or no queries: its data pointer may
// be null, which no tensor map can hold).
template <int kD>
std::optional<TmaBox> tile_box(const void* base, const int64_t (&s)[3], int64_t B, int64_t H,
                               int64_t rows, int width, int box_rows) {
  if (rows < 1 || base == nullptr) return std::nullopt;
  using L = SwizzleLayout<8, kD>;  // the column blocks are the same for any rows
  TmaBox t{base,
           {static_cast<uint64_t>(width), static_cast<uint64_t>(rows),
            static_cast<uint64_t>(H), static_cast<uint64_t>(B), 1},
           {},
           {L::kCols, static_cast<uint32_t>(box_rows), 1, 1, 1},
           L::kSpan};
  // Byte strides of dims 1-4. One that steps (more than one element) must be a positive
  // multiple of 16 below 2^40; one that never steps takes a packed tensor's (the previous
  // dimension's stride times its size), so no stride is ever smaller than a row needs.
  const int64_t elems[4] = {s[2], s[1], s[0], 0}, sizes[4] = {rows, H, B, 1};
  int64_t packed = int64_t(width) * 2;  // a packed row
  for (int d = 0; d < 4; ++d) {
    const int64_t bytes = sizes[d] > 1 ? elems[d] * 2 : packed;
    if (bytes <= 0 || bytes % 16 != 0 || bytes >= (int64_t(1) << 40)) return std::nullopt;
    t.strides[d] = static_cast<uint64_t>(bytes);
    packed = bytes * sizes[d];
  }
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0) return std::nullopt;
  return t;
}

// Kernel launches go through a Launcher (attention_cuda_launcher.cuh's CudaLauncher on the current
// stream; a CPU emulation of the CUDA model can stand in, which is why everything above the launch
// lives in this header): `Launcher::launch(kernel, grid, threads, smem, params)` runs `kernel` over
// `grid` with `smem` bytes of dynamic shared memory, `Launcher::wgmma()` says whether the Hopper
// kernels may run, `Launcher::tma()` whether they may load by TMA (head dims 64 up),
// `Launcher::turns()` whether the TMA forward's consumer warpgroups take turns on the tensor cores
// (TensorCoreTurns, head dims 64 to 128), and `Launcher::encode(map, box)` makes a TmaBox's tensor
// map.
template <typename T, int kD, class Launcher>
void run_fwd(const AttnParams& p) {
  using Cfg = Tiles<kD>;
  static_assert(smem_fits<kD>(), "a CTA's shared memory past what an A100 or H100 allows");
  // One CTA per (query tile of BM rows, head, batch), heavy tiles first (FwdTile).
  auto grid = [&](int BM) {
    return dim3(static_cast<unsigned>((p.L + BM - 1) / BM), static_cast<unsigned>(p.Hq),
                static_cast<unsigned>(p.B));
  };
  // The TMA forward built with dropout or without (Tiles::fwd_tma_n), where the inputs suit
  // tensor maps (tile_box): whether it was launched.
  auto launch_tma = [&](auto dropout) {
    constexpr bool kDropout = decltype(dropout)::value;
    constexpr int BM = Cfg::kFwdTmaM, BN = Cfg::template fwd_tma_n<kDropout>;
    const auto q = tile_box<kD>(p.q, p.sq, p.B, p.Hq, p.L, p.d_load, BM);
    const auto k = tile_box<kD>(p.k, p.sk, p.B, p.Hk, p.S, p.d_load, BN);
    const auto v = tile_box<kD>(p.v, p.sv, p.B, p.Hk, p.S, p.dv_load, BN);
    if (!q || !k || !v) return false;
    TmaFwdParams pt;
    pt.p = p;
    pt.turns = Launcher::turns();
    Launcher::encode(&pt.q, *q);
    Launcher::encode(&pt.k, *k);
    Launcher::encode(&pt.v, *v);
    Launcher::launch(attention_fwd_tma_kernel<T, kD, kDropout>, grid(BM), Cfg::kTmaThreads,
                     Cfg::template fwd_tma_smem<kDropout>(sizeof(T)), pt);
    return true;
  };
  if constexpr (Cfg::kFwdTma) {
    if (Launcher::wgmma() && Launcher::tma()) {
      bool launched;
      if constexpr (Cfg::kFwdTmaNoDropout) {
        launched = p.dropout ? launch_tma(std::true_type{}) : launch_tma(std::false_type{});
      } else {
        launched = launch_tma(std::true_type{});
      }
      if (launched) return;
    }
  }
  auto launch = [&](auto wgmma) {
    constexpr bool kWgmma = decltype(wgmma)::value;
    Launcher::launch(attention_fwd_kernel<T, kD, kWgmma>, grid(Cfg::template fwd_m<kWgmma>),
                     Cfg::template fwd_threads<kWgmma>, Cfg::template fwd_smem<kWgmma>(sizeof(T)),
                     p);
  };
  if (Launcher::wgmma()) {
    launch(std::true_type{});
  } else {
    launch(std::false_type{});
  }
}

// The Hopper backward kernels' tensor maps (dq_tma, dkdv_tma): q and dout in boxes of q_rows
// rows, k and v in boxes of kv_rows; nullopt where some input's strides suit no map (tile_box).
template <int kD, class Launcher>
std::optional<TmaBwdParams> bwd_tma_params(const AttnParams& p, int q_rows, int kv_rows) {
  const auto q = tile_box<kD>(p.q, p.sq, p.B, p.Hq, p.L, p.d_load, q_rows);
  const auto dout = tile_box<kD>(p.dout, p.sdo, p.B, p.Hq, p.L, p.dv_load, q_rows);
  const auto k = tile_box<kD>(p.k, p.sk, p.B, p.Hk, p.S, p.d_load, kv_rows);
  const auto v = tile_box<kD>(p.v, p.sv, p.B, p.Hk, p.S, p.dv_load, kv_rows);
  if (!q || !dout || !k || !v) return std::nullopt;
  TmaBwdParams pt;
  pt.p = p;
  Launcher::encode(&pt.q, *q);
  Launcher::encode(&pt.dout, *dout);
  Launcher::encode(&pt.k, *k);
  Launcher::encode(&pt.v, *v);
  return pt;
}

template <typename T, int kD, class Launcher>
void run_bwd(const AttnParams& p) {
  using Cfg = Tiles<kD>;
  static_assert(smem_fits<kD>(), "a CTA's shared memory past what an A100 or H100 allows");
  const int64_t rows = p.B * p.Hq * p.L;
  Launcher::launch(attention_bwd_prep_kernel<T>, dim3(static_cast<unsigned>((rows + 7) / 8)),
                   256, 0, p);
  auto grid = [&](int64_t n, int tile, int64_t heads) {
    return dim3(static_cast<unsigned>((n + tile - 1) / tile), static_cast<unsigned>(heads),
                static_cast<unsigned>(p.B));
  };
  // The TMA kernels where they serve (head dims 96 up on Hopper, FASTATTN_CUDA_TMA not "0") and
  // the inputs suit tensor maps; else the cp.async ones.
  bool tma = false;
  if constexpr (Cfg::kTma) tma = Launcher::wgmma() && Launcher::tma();
  std::optional<TmaBwdParams> tq, tkv;
  if (tma) {  // none with no keys (tile_box): the cp.async dQ kernel writes its zeros
    tq = bwd_tma_params<kD, Launcher>(p, Cfg::kDqTmaM, Cfg::kDqTmaN);
    tkv = bwd_tma_params<kD, Launcher>(p, Cfg::kKvM, Cfg::kKvN);
  }
  if constexpr (Cfg::kTma) {
    if (tq) {
      Launcher::launch(attention_bwd_dq_tma_kernel<T, kD>, grid(p.L, Cfg::kDqTmaM, p.Hq),
                       Cfg::kTmaThreads, Cfg::dq_tma_smem(sizeof(T)), *tq);
    }
  }
  if (!tq) {
    if (Launcher::wgmma()) {
      Launcher::launch(attention_bwd_dq_kernel<T, kD, true>, grid(p.L, Cfg::kFwdM, p.Hq), 128,
                       Cfg::template dq_smem<true>(sizeof(T)), p);
    } else {
      Launcher::launch(attention_bwd_dq_kernel<T, kD, false>, grid(p.L, Cfg::kFwdM, p.Hq), 128,
                       Cfg::template dq_smem<false>(sizeof(T)), p);
    }
  }
  if (p.S == 0) return;
  const dim3 grid_kv = grid(p.S, Cfg::kKvN, p.Hk);
  if constexpr (Cfg::kTma) {
    if (tkv) {
      Launcher::launch(attention_bwd_dkdv_tma_kernel<T, kD>, grid_kv, Cfg::kTmaThreads,
                       Cfg::dkdv_tma_smem(sizeof(T)), *tkv);
      return;
    }
  }
  if (Launcher::wgmma()) {
    Launcher::launch(attention_bwd_dkdv_kernel<T, kD, true>, grid_kv, 256,
                     Cfg::template dkdv_smem<true>(sizeof(T)), p);
  } else {
    Launcher::launch(attention_bwd_dkdv_kernel<T, kD, false>, grid_kv, 256,
                     Cfg::template dkdv_smem<false>(sizeof(T)), p);
  }
}

// The forward (kForward) or backward launch logic at padded head dim kD, for q's dtype. Its
// own function template so that a build can compile each head dim in a file of its own
// (attention_cuda_launcher.cuh: extern template; nvcc builds them in parallel).
template <class Launcher, bool kForward, int kD>
void run_head_dim(at::ScalarType dtype, const AttnParams& p) {
  auto run = [&](auto tag) {
    using T = decltype(tag);
    if constexpr (kForward) {
      run_fwd<T, kD, Launcher>(p);
    } else {
      run_bwd<T, kD, Launcher>(p);
    }
  };
  if (dtype == at::kBFloat16) {
    run(__nv_bfloat16{});
  } else {
    run(__half{});
  }
}

// run_head_dim for the padded head dim of p.
template <class Launcher, bool kForward>
void dispatch(at::ScalarType dtype, const AttnParams& p) {
  switch (padded_head_dim(p.D, p.Dv)) {
    case 32: run_head_dim<Launcher, kForward, 32>(dtype, p); break;
    case 64: run_head_dim<Launcher, kForward, 64>(dtype, p); break;
    case 96: run_head_dim<Launcher, kForward, 96>(dtype, p); break;
    case 128: run_head_dim<Launcher, kForward, 128>(dtype, p); break;
    case 192: run_head_dim<Launcher, kForward, 192>(dtype, p); break;
    default: run_head_dim<Launcher, kForward, 256>(dtype, p); break;
  }
}

// native_attention_fwd on q's device (checked to be CUDA, and guarded, by the caller).
template <class Launcher>
std::tuple<at::Tensor, at::Tensor> attention_fwd_impl(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& seed,
    double dropout_p, double scale, int64_t window_left, int64_t window_right, bool align_bottom,
    double softcap) {
  AttnParams p;
  std::vector<at::Tensor> keep;
  check_and_fill(q, k, v, mask, seed, dropout_p, scale, window_left, window_right, align_bottom,
                 softcap, p, keep);
  at::Tensor out = attention_output(q, p.Dv);
  at::Tensor lse = at::empty({p.B, p.Hq, p.L}, q.options().dtype(at::kFloat));
  if (p.B * p.Hq * p.L == 0) return {out, lse};
  p.out = out.data_ptr();
  strides4(out, p.so);
  p.out_vec = vec_ok(out);
  p.lse = lse.data_ptr<float>();
  dispatch<Launcher, true>(q.scalar_type(), p);
  return {out, lse};
}

// native_attention_bwd on q's device (checked to be CUDA, and guarded, by the caller).
template <class Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_impl(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& seed, double dropout_p, double scale, int64_t window_left,
    int64_t window_right, bool align_bottom, double softcap, bool mask_grad) {
  AttnParams p;
  std::vector<at::Tensor> keep;
  check_and_fill(q, k, v, mask, seed, dropout_p, scale, window_left, window_right, align_bottom,
                 softcap, p, keep);
  const c10::Device device = q.device();
  const std::vector<int64_t> out_shape{p.B, p.Hq, p.L, p.Dv};
  check_float_on(grad_out, "grad_out", device);
  check_float_on(out, "out", device);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.sizes() == at::IntArrayRef(out_shape),
              "grad_out must have shape ", out_shape, " (B, Hq, L, Dv), got ", grad_out.sizes());
  TORCH_CHECK(out.dim() == 4 && out.sizes() == at::IntArrayRef(out_shape),
              "out must have shape ", out_shape, " (B, Hq, L, Dv), got ", out.sizes());
  TORCH_CHECK(lse.device() == device && lse.scalar_type() == at::kFloat,
              "lse must be a float32 tensor on ", device, ", got ", lse.scalar_type(), " on ",
              lse.device());
  TORCH_CHECK(lse.sizes() == at::IntArrayRef({p.B, p.Hq, p.L}), "lse must have shape [", p.B,
              ", ", p.Hq, ", ", p.L, "] (B, Hq, L), got ", lse.sizes());
  TORCH_CHECK(!mask_grad || p.mask_kind == kAttnAdditiveMask,
              "mask_grad=True needs an additive (floating) mask");
  at::Tensor dq = at::empty_like(q);
  at::Tensor dk = at::empty_like(k);
  at::Tensor dv = at::empty_like(v);
  at::Tensor dmask = mask_grad ? at::zeros({p.B, p.Hq, p.L, p.S}, q.options().dtype(at::kFloat))
                               : at::empty({0}, q.options().dtype(at::kFloat));
  if (p.B * p.Hk == 0) return {dq, dk, dv, dmask};
  if (p.L == 0) {  // no queries: nothing reaches k and v
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv, dmask};
  }
  const at::Tensor go = kernel_input(grad_out.scalar_type() == q.scalar_type()
                                         ? grad_out
                                         : grad_out.to(q.scalar_type()));
  keep.push_back(go);
  p.dout = go.data_ptr();
  strides3(go, p.sdo);
  TORCH_CHECK(go.size(3) == p.dv_load, "internal: grad_out and v padded differently");
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor lse2 = at::empty({p.B, p.Hq, p.L}, q.options().dtype(at::kFloat));
  at::Tensor delta = at::empty({p.B, p.Hq, p.L}, q.options().dtype(at::kFloat));
  keep.push_back(lse_c);
  p.out_in = out.data_ptr();
  p.out_dtype = dtype_code(out.scalar_type());
  strides4(out, p.soi);
  p.lse_in = lse_c.data_ptr<float>();
  p.lse2 = lse2.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  strides4(dq, p.sdq);
  strides4(dk, p.sdk);
  strides4(dv, p.sdv);
  p.dq_vec = vec_ok(dq);
  p.dk_vec = vec_ok(dk);
  p.dv_vec = vec_ok(dv);
  p.dmask = mask_grad ? dmask.data_ptr<float>() : nullptr;
  dispatch<Launcher, false>(q.scalar_type(), p);
  return {dq, dk, dv, dmask};
}

}  // namespace attention
}  // namespace fastattn::cuda
