// What the attention CPU kernels receive: raw pointers, dtypes and strides, built and checked by
// csrc/attention/attention_cpu.cpp; and the dropout generator shared by the kernels and the
// launcher of native_attention_dropout_mask.
#pragma once

#include <c10/core/ScalarType.h>

#include <atomic>
#include <cstdint>

#include "../common/cpu_dispatch.h"

namespace fastattn::cpu {

enum class AttnMask { kNone, kBool, kAdditive };

// Shapes follow fastattn.reference: q (B, Hq, L, D), k (B, Hk, S, D), v (B, Hk, S, Dv),
// mask broadcast to (B, Hq, L, S), out / grad_out (B, Hq, L, Dv). Strides are in elements, four
// per tensor in dim order (0 for broadcast dims).
struct AttentionParams {
  int64_t B, Hq, Hk, L, S, D, Dv;
  c10::ScalarType dtype;  // of q, k, v
  const void *q, *k, *v;
  int64_t sq[4], sk[4], sv[4];
  const void* mask;
  c10::ScalarType mask_dtype;
  AttnMask mask_kind;
  int64_t sm[4];
  double scale, softcap;  // softcap 0: none
  int64_t left, right;    // window; -1 unbounded
  int64_t offset;         // 0 (top-left) or S - L (bottom-right)
  double dropout_p;
  uint64_t seed;
  bool acc_double;  // float64 inputs accumulate in double, everything else in float
  // forward
  void* out;  // (B, Hq, L, Dv), q's dtype
  int64_t so[4];
  float* lse;  // (B, Hq, L) contiguous
  // backward
  const void* grad_out;
  c10::ScalarType grad_out_dtype;
  int64_t sg[4];
  const void* out_in;  // the forward's output, for delta = rowsum(grad_out * out)
  c10::ScalarType out_dtype;
  int64_t soi[4];
  const float* lse_in;
  void *dq, *dk, *dv;  // q's, k's, v's dtype
  int64_t sdq[4], sdk[4], sdv[4];
  void* dmask;  // (B, Hq, L, S) contiguous, float or double (acc dtype); null when not wanted
  void* work;   // forward: packed key/value blocks, in the acc dtype
  // Forward: per key block of (B, Hk, blocks), 0 unpacked, 1 being packed, 2 packed; the first
  // tile that needs a block packs it, so the forward is one parallel region.
  std::atomic<uint8_t>* pack_state;
  // Backward: key blocks are split into `chunks` ranges per key/value head; with more than one,
  // each range writes its part of dq (scaled, acc dtype) to dq_part (chunks, B, Hq, L, D) and
  // attention_bwd_dq_reduce adds the parts in range order.
  int64_t chunks;
  void* dq_part;
};

// Query rows per tile and keys per block; head dims are padded (with zeros, in the kernels'
// float buffers only) to a multiple of kPad, the widest vector of floats.
constexpr int64_t kBlockM = 64;
constexpr int64_t kBlockN = 128;
constexpr int64_t kPad = 16;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Elements of the forward's packed key/value workspace: per (b, hk, key block), K^T (D x kBlockN)
// then V (kBlockN x round_up(Dv, kPad)).
inline int64_t fwd_work_elements(const AttentionParams& p) {
  const int64_t blocks = (p.S + kBlockN - 1) / kBlockN;
  return p.B * p.Hk * blocks * kBlockN * (p.D + round_up(p.Dv, kPad));
}

// Dropout keep decision for element (b * Hq + h, i, j), flat index ((b*Hq + h)*L + i)*S + j:
// SplitMix64 at that position of the stream seeded with `seed` (a counter-based generator, so
// forward, backward and native_attention_dropout_mask draw the same bits with no state), kept
// when its top 32 bits reach `threshold` = round(dropout_p * 2^32): keep probability 1 - p.
inline bool dropout_keep(uint64_t seed, uint64_t index, uint64_t threshold) {
  uint64_t z = seed + (index + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return (z >> 32) >= threshold;
}

inline uint64_t dropout_threshold(double p) {
  const double t = p * 4294967296.0 + 0.5;
  return t >= 4294967295.0 ? 4294967295ull : static_cast<uint64_t>(t);
}

// Forward: query tiles [begin, end) of (B, Hq, tiles). Backward: key ranges [begin, end) of (B, Hk, chunks), then
// (when chunks > 1) dq rows [begin, end) of (B, Hq, L).
FASTATTN_DECLARE_CPU_KERNEL(void, attention_fwd_tiles, const AttentionParams&, int64_t, int64_t)
FASTATTN_DECLARE_CPU_KERNEL(void, attention_bwd_heads, const AttentionParams&, int64_t, int64_t)
FASTATTN_DECLARE_CPU_KERNEL(void, attention_bwd_dq_reduce, const AttentionParams&, int64_t,
                            int64_t)

}  // namespace fastattn::cpu
