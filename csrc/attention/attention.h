// What the attention CPU kernels receive: raw pointers, dtypes and strides, built and checked by
// csrc/attention/attention_cpu.cpp; and the dropout generator shared by the kernels and the
// launcher of native_attention_dropout_mask.
#pragma once

#include <c10/core/ScalarType.h>

#include <atomic>
#include <cstdint>

#include "../common/cpu_dispatch.h"
#include "../common/dropout.h"

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

// The dropout generator (dropout_keep, dropout_threshold) lives in ../common/dropout.h, shared
// with the CUDA kernels.
using fastattn::dropout_keep;
using fastattn::dropout_threshold;

// Tasks 0 .. n-1, handed out one at a time to whichever thread asks next: tasks are coarse and
// of unequal cost (causal), and a core shared with another process must not hold up a fixed
// share of the work. A kernel pops tasks until none is left, so its scratch buffers are
// allocated once per thread, not once per task (at L = 128 that was 8 x 64 KB zero-filled per
// forward). Each task writes its own outputs, so the order does not change the result.
struct TaskQueue {
  std::atomic<int64_t> next{0};
  int64_t n = 0;
  bool pop(int64_t& task) {
    task = next.fetch_add(1, std::memory_order_relaxed);
    return task < n;
  }
};

// Forward tasks: query tiles of (B, Hq, tiles). Backward tasks: key ranges of (B, Hk, chunks),
// then (when chunks > 1) dq rows [begin, end) of (B, Hq, L).
FASTATTN_DECLARE_CPU_KERNEL(void, attention_fwd_tiles, const AttentionParams&, TaskQueue&)
FASTATTN_DECLARE_CPU_KERNEL(void, attention_bwd_heads, const AttentionParams&, TaskQueue&)
FASTATTN_DECLARE_CPU_KERNEL(void, attention_bwd_dq_reduce, const AttentionParams&, int64_t,
                            int64_t)

}  // namespace fastattn::cpu
