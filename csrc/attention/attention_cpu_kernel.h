// Fused attention on CPU (FlashAttention-2 style), forward and backward, for one CPU capability
// (compiled by attention_cpu_{default,avx2,avx512}.cpp; the launcher is attention_cpu.cpp).
//
// What it computes, per batch b and query head h (key/value head hk = h / (Hq / Hk), GQA by
// index, K/V never repeated), as fastattn.reference.attention_fwd / attention_bwd:
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
// zero gradients. z is drawn by a counter-based generator (dropout_keep in attention.h), so the
// backward regenerates the forward's mask with nothing stored.
//
// Algorithm. Everything is computed in float (double for float64 inputs) in small row-major
// buffers; inputs of any dtype and strides are converted row by row as they are read, and
// nothing of size L x S is ever formed.
// - Forward: key blocks are packed once per (b, hk) into the workspace (K^T blocks of
//   D x 128 and V blocks of 128 x Dv, in float) by the first tile that needs them, so every
//   query tile reuses them without converting again, and the forward is one parallel region. Then each task is one tile of 64 query rows of one (b, h), handed to
//   the threads one at a time: q is scaled as it is loaded, S = Q K^T by a register-blocked
//   micro-kernel (4 rows x 2-4 vectors of keys, FMA over the head dim, accumulators in
//   registers), softcap / mask / window on the 64 x 128 score tile, online softmax (running max
//   and sum, the output rescaled when the max grows), O += P V by the same micro-kernel. Only
//   key blocks that some row of the tile can see are visited (causal and window block
//   skipping).
// - Backward: one task per (b, hk) key/value head and range of key blocks, looping over the
//   group's query heads, their query tiles, and the visible key blocks of its range
//   (query-outer order): P recomputed from lse, dV += P^T dO, dP = dO V^T, dS = P (dP - delta),
//   dQ += dS K kept for the tile, dK += dS^T Q kept for the range. dK and dV are owned by one
//   task; with one range per head (B Hk >= threads) so is dQ, otherwise each range writes its
//   part of dQ to its own buffer and the parts are added in range order. No atomics: the
//   result is bitwise reproducible for a given thread count. Float64 inputs keep one range and
//   recompute lse in double (the saved lse is float32).
//
// Work: forward 2 L S (D + Dv) flops per head (halved by causal skipping), backward 2.5x that
// (5 products: S, dP, dV, dQ, dK); bytes: q, k, v, out once each forward, plus the mask rows
// read through their strides (a broadcast mask costs nothing extra). Memory: the forward's
// packed K/V workspace, B Hk S (D + Dv) floats (doubles for float64); the backward's
// per-thread buffers, about 5 S (D + Dv) floats, dq parts (ranges x the size of q, in float)
// when heads are split, and dmask (B, Hq, L, S) only when asked.
//
// Not done: no blocked GEMM library (the micro-kernel comes
// close to PyTorch's MKL-backed flash kernel per core on AVX-512, not to the FMA peak);
// bool-mask and dropout elements are handled one at a time. The CUDA kernels of the same ops
// are attention_cuda.cu.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#include "../common/vec_rows.h"
#include "attention.h"

namespace fastattn::cpu::CPU_CAPABILITY {

namespace {

// Vectors of keys (or output columns) per micro-kernel step: kRows x kVecs accumulators must
// fit the register file (32 zmm with AVX-512, 16 ymm with AVX2).
template <typename A>
constexpr int kVecs = sizeof(Vectorized<A>) >= 64 ? 4 : 2;
// Rows per step: 6 x 4 accumulators + 4 vectors of B + 1 broadcast = 29 of AVX-512's 32.
template <typename A>
constexpr int kRows = kVecs<A> == 4 ? 6 : 4;
static_assert(kPad % Vectorized<float>::size() == 0 && kBlockN % Vectorized<float>::size() == 0,
              "buffers are padded to whole vectors");

// C[0:RM, 0:NV*VS] (+)= op(A)[0:RM, 0:K] B[0:K, 0:NV*VS], accumulators in registers. The
// product is summed from zero and added to C at the end, not summed onto C: an accumulator
// that many tiles add into (dV and dK over every query tile, O over every key block) then
// rounds one sum of K terms plus one add per tile, where a running sum would round all of
// them in one chain (dK and dV of the first keys under a causal mask, L = 1024: 2-10x the max
// error of PyTorch's CPU SDPA against float64 as one chain, 0.5-1.3x now).
template <typename A, bool kTransA, int RM, int NV>
inline void micro(int64_t K, const A* a, int64_t lda, const A* b, int64_t ldb, A* c, int64_t ldc,
                  bool accumulate) {
  using V = Vectorized<A>;
  constexpr int VS = V::size();
  V r[RM][NV];
  for (int i = 0; i < RM; ++i) {
    for (int v = 0; v < NV; ++v) r[i][v] = V(A(0));
  }
  for (int64_t k = 0; k < K; ++k) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = V::loadu(b + k * ldb + v * VS);
    for (int i = 0; i < RM; ++i) {
      const V ai(kTransA ? a[k * lda + i] : a[i * lda + k]);
      for (int v = 0; v < NV; ++v) r[i][v] = at::vec::fmadd(ai, bv[v], r[i][v]);
    }
  }
  for (int i = 0; i < RM; ++i) {
    for (int v = 0; v < NV; ++v) {
      A* out = c + i * ldc + v * VS;
      (accumulate ? V::loadu(out) + r[i][v] : r[i][v]).store(out);
    }
  }
}

// C (M x N) (+)= op(A) (M x K) B (K x N), all row-major; op(A)(i, k) = a[i lda + k], or
// a[k lda + i] when kTransA (so P^T and dS^T are read in place). N is a multiple of the vector
// size: every buffer's columns are padded with zeros to kPad.
template <typename A, bool kTransA>
void gemm(int64_t M, int64_t N, int64_t K, const A* a, int64_t lda, const A* b, int64_t ldb,
          A* c, int64_t ldc, bool accumulate) {
  constexpr int VS = Vectorized<A>::size();
  constexpr int NV = kVecs<A>;
  auto arow = [&](int64_t i) { return kTransA ? a + i : a + i * lda; };
  int64_t j = 0;
  for (; j + NV * VS <= N; j += NV * VS) {
    int64_t i = 0;
    for (; i + kRows<A> <= M; i += kRows<A>) {
      micro<A, kTransA, kRows<A>, NV>(K, arow(i), lda, b + j, ldb, c + i * ldc + j, ldc,
                                      accumulate);
    }
    for (; i + 4 <= M; i += 4) {
      micro<A, kTransA, 4, NV>(K, arow(i), lda, b + j, ldb, c + i * ldc + j, ldc, accumulate);
    }
    for (; i < M; ++i) {
      micro<A, kTransA, 1, NV>(K, arow(i), lda, b + j, ldb, c + i * ldc + j, ldc, accumulate);
    }
  }
  for (; j < N; j += VS) {
    int64_t i = 0;
    for (; i + 4 <= M; i += 4) {
      micro<A, kTransA, 4, 1>(K, arow(i), lda, b + j, ldb, c + i * ldc + j, ldc, accumulate);
    }
    for (; i < M; ++i) {
      micro<A, kTransA, 1, 1>(K, arow(i), lda, b + j, ldb, c + i * ldc + j, ldc, accumulate);
    }
  }
}

template <typename A>
constexpr A kNegInf = -std::numeric_limits<A>::infinity();

// exp(x) of scores minus their row maximum (x <= 0, -inf for masked keys, NaN propagates),
// where AVX-512 is absent: vec_rows.h's fast_exp without the overflow side, which these
// arguments never reach. x = n ln2 + r, |r| <= ln2/2, e^r by its degree-6 Taylor polynomial
// (truncation about 1 ulp), times 2^n built in the exponent bits (n >= -126 after the clamp, so
// one step suffices); x below ln(FLT_MIN), -inf included, gives exactly 0.
inline Vectorized<float> exp_scores(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  using VI = Vectorized<int32_t>;
  const V lo(-87.33654f);
  const V xc = at::vec::maximum(x, lo);
  const V n = (xc * V(1.44269504f)).round();
  V r = at::vec::fmadd(n, V(-0.693359375f), xc);
  r = at::vec::fmadd(n, V(2.12194440e-4f), r);
  V p(1.f / 720.f);
  p = at::vec::fmadd(p, r, V(1.f / 120.f));
  p = at::vec::fmadd(p, r, V(1.f / 24.f));
  p = at::vec::fmadd(p, r, V(1.f / 6.f));
  p = at::vec::fmadd(p, r, V(0.5f));
  p = at::vec::fmadd(p, r, V(1.f));
  p = at::vec::fmadd(p, r, V(1.f));
  const VI e = (at::vec::convert_to_int_of_same_size(n) + VI(127)) << VI(23);
  return V::blendv(p * at::vec::cast<float>(e), V(0.f), x < lo);
}

inline Vectorized<double> exp_scores(const Vectorized<double>& x) { return x.exp(); }

// s[0:n] = exp(s[0:n] - m) in place (m >= every s, or NaN); returns the sum. With AVX-512 the
// float rows go through vec_rows.h's base-2 sweep (exp_sum_chunk: 8 multiply-add-class
// instructions a vector and vscalefps, exactly 0 for -inf); elsewhere through exp_scores.
template <typename A>
A exp_row(A* s, int64_t n, A m) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) return exp_sum_chunk<true>(s, n, 1.f, m, s);
#endif
  using V = Vectorized<A>;
  const V vm(m);
  V acc(A(0));
  for (int64_t c = 0; c < n; c += V::size()) {
    const V e = exp_scores(V::loadu(s + c) - vm);
    e.store(s + c);
    acc += e;
  }
  return vec_sum(acc);
}

// The keys [lo, hi) that query row i may see (window and sequence end).
inline void key_range(const AttentionParams& p, int64_t i, int64_t& lo, int64_t& hi) {
  lo = p.left >= 0 ? std::max<int64_t>(0, i + p.offset - p.left) : 0;
  hi = p.right >= 0 ? std::min<int64_t>(p.S, i + p.offset + p.right + 1) : p.S;
}

// Key blocks a tile of query rows [i0, i1) visits.
inline void block_range(const AttentionParams& p, int64_t i0, int64_t i1, int64_t& first,
                        int64_t& last) {
  int64_t lo0, hi0, lo1, hi1;
  key_range(p, i0, lo0, hi0);
  key_range(p, i1 - 1, lo1, hi1);
  first = lo0 / kBlockN;
  last = hi1 > lo0 ? (hi1 + kBlockN - 1) / kBlockN : first;  // exclusive
}

// Turns the products s[0:kBlockN] of query row i (already scaled: the kernels multiply q by
// scale as they load it) with keys j0 + c into masked scores: softcap (tanh written to `t`
// when given), additive or bool mask, window and the end of the sequence (-inf). `mbuf` holds
// kBlockN elements.
template <typename A>
void score_row(const AttentionParams& p, int64_t b, int64_t h, int64_t i, int64_t j0, A* s, A* t,
               A* mbuf) {
  using V = Vectorized<A>;
  const int64_t nval = std::min(kBlockN, p.S - j0);
  if (p.softcap > 0) {
    const V x(static_cast<A>(1.0 / p.softcap)), cap(static_cast<A>(p.softcap));
    for (int64_t c = 0; c < kBlockN; c += V::size()) {
      const V th = (V::loadu(s + c) * x).tanh();
      if (t != nullptr) th.store(t + c);
      (th * cap).store(s + c);
    }
  }
  const int64_t moff = b * p.sm[0] + h * p.sm[1] + i * p.sm[2] + j0 * p.sm[3];
  if (p.mask_kind == AttnMask::kAdditive) {
    load_any(p.mask, p.mask_dtype, moff, p.sm[3], nval, mbuf);
    for (int64_t c = 0; c < nval; ++c) s[c] += mbuf[c];
  } else if (p.mask_kind == AttnMask::kBool) {
    const auto* m = static_cast<const uint8_t*>(p.mask) + moff;
    for (int64_t c = 0; c < nval; ++c) s[c] = m[c * p.sm[3]] ? s[c] : kNegInf<A>;
  }
  int64_t lo, hi;
  key_range(p, i, lo, hi);
  const int64_t clo = std::clamp<int64_t>(lo - j0, 0, kBlockN);
  const int64_t chi = std::clamp<int64_t>(hi - j0, clo, kBlockN);
  std::fill(s, s + clo, kNegInf<A>);
  std::fill(s + chi, s + kBlockN, kNegInf<A>);
}

inline uint64_t drop_index(const AttentionParams& p, int64_t b, int64_t h, int64_t i,
                           int64_t j) {
  return static_cast<uint64_t>(((b * p.Hq + h) * p.L + i) * p.S + j);
}

// Online-softmax update of one row: s (masked scores) becomes exp(s - m_new) (0 for a row that
// has seen no key yet), m and l are the running max and sum; returns the factor the row's
// output accumulator must be multiplied by.
// Only s[0:n] is read and written (n a multiple of the vector size): the caller knows every
// later score of the block is masked for this row.
template <typename A>
A online_row(A* s, int64_t n, A& m, A& l) {
  const A mx = row_max(s, n);
  const A mnew = std::isnan(mx) ? mx : std::max(m, mx);
  if (mnew == kNegInf<A>) {
    std::fill(s, s + n, A(0));
    return A(1);
  }
  const A alpha = mnew == m ? A(1) : std::exp(m - mnew);
  l = l * alpha + exp_row(s, n, mnew);
  m = mnew;
  return alpha;
}

// Keys are packed kKeyGroup at a time: their rows are read into a buffer, then transposed.
constexpr int64_t kKeyGroup = 16;
static_assert(kBlockN % kKeyGroup == 0, "a key group never straddles two blocks");

// dst[d * ld + c] = rows[c * lr + d] for c < n, d < D: the rows of n <= kKeyGroup keys become
// columns of a D x ld block. Float groups of 16 go through at::vec's 16 x 16 register
// transpose: vector loads and stores, where a strided store per element was 28% of the
// forward's own time outside the products (perf, L 128, head dim 64).
template <typename A>
void keys_to_columns(const A* rows, int64_t lr, int64_t n, int64_t D, A* dst, int64_t ld) {
  int64_t d0 = 0;
  if constexpr (std::is_same_v<A, float>) {
    if (n == kKeyGroup) {
      for (; d0 + 16 <= D; d0 += 16) {
        at::vec::transpose_mxn<float, 16, 16>(rows + d0, lr, dst + d0 * ld, ld);
      }
    }
  }
  for (int64_t c = 0; c < n; ++c) {
    for (int64_t d = d0; d < D; ++d) dst[d * ld + c] = rows[c * lr + d];
  }
}

// Packs key block `idx` of (B, Hk, blocks) into the workspace unless done: the first thread to
// claim it packs it, a thread that finds it being packed yields until it is ready.
template <typename A>
void fwd_pack(const AttentionParams& p, int64_t idx, std::vector<A>& row) {
  std::atomic<uint8_t>& state = p.pack_state[idx];
  if (state.load(std::memory_order_acquire) == 2) return;
  uint8_t unpacked = 0;
  if (!state.compare_exchange_strong(unpacked, 1, std::memory_order_acq_rel)) {
    while (state.load(std::memory_order_acquire) != 2) std::this_thread::yield();
    return;
  }
  const int64_t blocks = (p.S + kBlockN - 1) / kBlockN;
  const int64_t D = p.D, Dv = p.Dv, Dvp = round_up(Dv, kPad);
  row.resize(kKeyGroup * std::max<int64_t>(D, 1));
  {
    const int64_t blk = idx % blocks, bh = idx / blocks, hk = bh % p.Hk, b = bh / p.Hk;
    A* kt = static_cast<A*>(p.work) + idx * kBlockN * (D + Dvp);  // (D, kBlockN)
    A* vb = kt + D * kBlockN;                                      // (kBlockN, Dvp)
    // Keys of this block, then zeros up to the vector multiple the products read (`ncols` of
    // fwd_tiles is at most round_up(S - j0, vector size), and kPad is a multiple of that); the
    // columns past it are never read. Rows of zeros, not columns: a strided zero per element
    // was most of a short sequence's forward.
    const int64_t nkeys = std::min(kBlockN, p.S - blk * kBlockN);
    const int64_t ncols = std::min(kBlockN, round_up(nkeys, kPad));
    for (int64_t c0 = 0; c0 < nkeys; c0 += kKeyGroup) {
      const int64_t n = std::min(kKeyGroup, nkeys - c0);
      for (int64_t c = c0; c < c0 + n; ++c) {
        const int64_t j = blk * kBlockN + c;
        load_any(p.k, p.dtype, b * p.sk[0] + hk * p.sk[1] + j * p.sk[2], p.sk[3], D,
                 row.data() + (c - c0) * D);
        load_any(p.v, p.dtype, b * p.sv[0] + hk * p.sv[1] + j * p.sv[2], p.sv[3], Dv,
                 vb + c * Dvp);
        std::fill(vb + c * Dvp + Dv, vb + (c + 1) * Dvp, A(0));
      }
      keys_to_columns(row.data(), D, n, D, kt + c0, kBlockN);
    }
    for (int64_t d = 0; d < D; ++d) {
      std::fill(kt + d * kBlockN + nkeys, kt + d * kBlockN + ncols, A(0));
    }
    std::fill(vb + nkeys * Dvp, vb + ncols * Dvp, A(0));
  }
  state.store(2, std::memory_order_release);
}

template <typename A>
void fwd_tiles(const AttentionParams& p, TaskQueue& tasks) {
  const int64_t tiles = (p.L + kBlockM - 1) / kBlockM;
  const int64_t blocks = (p.S + kBlockN - 1) / kBlockN;
  const int64_t D = p.D, Dv = p.Dv, Dvp = round_up(Dv, kPad), group = p.Hq / p.Hk;
  const uint64_t threshold = dropout_threshold(p.dropout_p);
  const A drop_scale = static_cast<A>(1.0 / (1.0 - p.dropout_p));
  // Q, O and S tiles left uninitialised (new A[], not a vector's zeros: 64 KB of memset per
  // call at head dim 64): each task writes every element it reads (O is zeroed per tile below).
  const std::unique_ptr<A[]> qbuf(new A[kBlockM * std::max<int64_t>(D, 1)]),
      obuf(new A[kBlockM * Dvp + 1]), sbuf(new A[kBlockM * kBlockN]);
  std::vector<A> mbuf(kBlockN), mrow(kBlockM), lrow(kBlockM), row;
  A *Q = qbuf.get(), *O = obuf.get(), *Sb = sbuf.get();
  for (int64_t idx; tasks.pop(idx);) {  // the buffers above carry nothing between tasks
    const int64_t tile = idx % tiles, bh = idx / tiles, h = bh % p.Hq, b = bh / p.Hq;
    const int64_t hk = h / group, i0 = tile * kBlockM, m = std::min(kBlockM, p.L - i0);
    for (int64_t r = 0; r < m; ++r) {
      load_any(p.q, p.dtype, b * p.sq[0] + h * p.sq[1] + (i0 + r) * p.sq[2], p.sq[3], D,
               Q + r * D);
      row_scale(Q + r * D, D, static_cast<A>(p.scale));
    }
    std::fill(O, O + m * Dvp, A(0));
    std::fill(mrow.begin(), mrow.end(), kNegInf<A>);
    std::fill(lrow.begin(), lrow.end(), A(0));
    int64_t first, last;
    block_range(p, i0, i0 + m, first, last);
    // Keys past the last row's window end (causal: the diagonal) are masked for every row of
    // the tile: each block's products stop at `ncols`, the first multiple of the vector size
    // past them (score_row masks the columns between).
    int64_t lo_last, hi_last;
    key_range(p, i0 + m - 1, lo_last, hi_last);
    for (int64_t blk = first; blk < last; ++blk) {
      const int64_t j0 = blk * kBlockN;
      const int64_t ncols = round_up(std::clamp<int64_t>(hi_last - j0, 1, kBlockN),
                                     static_cast<int64_t>(Vectorized<A>::size()));
      fwd_pack(p, (b * p.Hk + hk) * blocks + blk, row);
      const A* kt = static_cast<const A*>(p.work) + ((b * p.Hk + hk) * blocks + blk) * kBlockN *
                                                        (D + Dvp);
      gemm<A, false>(m, ncols, D, Q, D, kt, kBlockN, Sb, kBlockN, false);
      for (int64_t r = 0; r < m; ++r) {
        A* s = Sb + r * kBlockN;
        score_row(p, b, h, i0 + r, j0, s, static_cast<A*>(nullptr), mbuf.data());
        const A alpha = online_row(s, ncols, mrow[r], lrow[r]);
        if (alpha != A(1)) row_scale(O + r * Dvp, Dvp, alpha);
        if (p.dropout_p > 0) {
          const int64_t nval = std::min(kBlockN, p.S - j0);
          const uint64_t base = drop_index(p, b, h, i0 + r, j0);
          for (int64_t c = 0; c < nval; ++c) {
            if (!dropout_keep(p.seed, base + c, threshold)) s[c] = A(0);
          }
        }
      }
      gemm<A, false>(m, Dvp, ncols, Sb, kBlockN, kt + D * kBlockN, Dvp, O, Dvp, true);
    }
    for (int64_t r = 0; r < m; ++r) {
      const int64_t i = i0 + r;
      const bool dead = lrow[r] == A(0) || mrow[r] == kNegInf<A>;
      A* o = O + r * Dvp;
      if (dead) {
        std::fill(o, o + Dvp, A(0));
      } else {
        row_scale(o, Dvp, drop_scale / lrow[r]);
      }
      store_any(o, Dv, p.out, p.dtype, b * p.so[0] + h * p.so[1] + i * p.so[2], p.so[3]);
      p.lse[(b * p.Hq + h) * p.L + i] =
          dead ? -std::numeric_limits<float>::infinity()
               : static_cast<float>(mrow[r] + std::log(lrow[r]));
    }
  }
}

// Per-thread buffers of the backward.
template <typename A>
struct BwdBuffers {
  std::vector<A> kt, kr, vt, dk, dv;           // per key/value head
  std::vector<A> q, go, dq, s, t, pd, kf, ds;  // per query tile
  std::vector<A> row, mbuf, lse, delta;
};

template <typename A>
void bwd_head(const AttentionParams& p, int64_t b, int64_t hk, int64_t chunk, BwdBuffers<A>& w) {
  // This task owns key blocks [kb0, kb1), keys [jb, je).
  const int64_t blocks = (p.S + kBlockN - 1) / kBlockN;
  const int64_t kb0 = chunk * blocks / p.chunks, kb1 = (chunk + 1) * blocks / p.chunks;
  const int64_t nb = kb1 - kb0, Sp = nb * kBlockN, jb = kb0 * kBlockN;
  const int64_t je = std::min(p.S, kb1 * kBlockN);
  const int64_t D = p.D, Dv = p.Dv, Dp = round_up(D, kPad), Dvp = round_up(Dv, kPad);
  const int64_t group = p.Hq / p.Hk, tiles = (p.L + kBlockM - 1) / kBlockM;
  const bool softcap = p.softcap > 0, dropout = p.dropout_p > 0;
  const uint64_t threshold = dropout_threshold(p.dropout_p);
  const A drop_scale = static_cast<A>(1.0 / (1.0 - p.dropout_p));
  const A scale = static_cast<A>(p.scale);
  using V = Vectorized<A>;

  // K^T and V^T blocks (for S and dP) and K rows (for dQ), zero beyond S and beyond D / Dv.
  w.kt.assign(nb * D * kBlockN, A(0));
  w.vt.assign(nb * Dv * kBlockN, A(0));
  w.kr.assign(Sp * Dp, A(0));
  w.dk.assign(Sp * Dp, A(0));
  w.dv.assign(Sp * Dvp, A(0));
  w.row.resize(kKeyGroup * std::max<int64_t>({D, Dv, 1}));
  for (int64_t j0 = jb; j0 < je; j0 += kKeyGroup) {  // groups never straddle blocks
    const int64_t n = std::min(kKeyGroup, je - j0);
    const int64_t blk = (j0 - jb) / kBlockN, c0 = (j0 - jb) % kBlockN;
    for (int64_t j = j0; j < j0 + n; ++j) {
      load_any(p.k, p.dtype, b * p.sk[0] + hk * p.sk[1] + j * p.sk[2], p.sk[3], D,
               w.kr.data() + (j - jb) * Dp);
      load_any(p.v, p.dtype, b * p.sv[0] + hk * p.sv[1] + j * p.sv[2], p.sv[3], Dv,
               w.row.data() + (j - j0) * Dv);
    }
    keys_to_columns(w.kr.data() + (j0 - jb) * Dp, Dp, n, D, w.kt.data() + blk * D * kBlockN + c0,
                    kBlockN);
    keys_to_columns(w.row.data(), Dv, n, Dv, w.vt.data() + blk * Dv * kBlockN + c0, kBlockN);
  }
  w.q.assign(kBlockM * Dp, A(0));
  w.go.assign(kBlockM * Dvp, A(0));
  w.dq.resize(kBlockM * Dp);
  for (auto* buf : {&w.s, &w.pd, &w.kf, &w.ds}) buf->resize(kBlockM * kBlockN);
  w.t.resize(softcap ? kBlockM * kBlockN : 0);
  w.mbuf.resize(kBlockN);
  w.lse.resize(kBlockM);
  w.delta.resize(kBlockM);
  A *Q = w.q.data(), *G = w.go.data(), *dQ = w.dq.data(), *Sb = w.s.data(), *PD = w.pd.data();
  A* DS = w.ds.data();

  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t i0 = tile * kBlockM, m = std::min(kBlockM, p.L - i0);
      int64_t first, last;
      block_range(p, i0, i0 + m, first, last);
      first = std::max(first, kb0);  // the float64 path has one chunk: all blocks
      last = std::min(last, kb1);
      for (int64_t r = 0; r < m; ++r) {
        const int64_t i = i0 + r;
        // q * scale: the scores come out scaled, and dK = dS'^T (scale q) needs it too.
        load_any(p.q, p.dtype, b * p.sq[0] + h * p.sq[1] + i * p.sq[2], p.sq[3], D, Q + r * Dp);
        row_scale(Q + r * Dp, D, scale);
        A* g = G + r * Dvp;
        load_any(p.grad_out, p.grad_out_dtype, b * p.sg[0] + h * p.sg[1] + i * p.sg[2],
                 p.sg[3], Dv, g);
        load_any(p.out_in, p.out_dtype, b * p.soi[0] + h * p.soi[1] + i * p.soi[2], p.soi[3],
                 Dv, w.row.data());
        w.delta[r] = row_dot_chunk(g, w.row.data(), Dv);  // Dv <= 256: one chunk
        const float lse = p.lse_in[(b * p.Hq + h) * p.L + i];
        w.lse[r] = static_cast<A>(lse);
      }
      std::fill(dQ, dQ + m * Dp, A(0));  // stays 0 when the tile sees no key
      if (std::is_same_v<A, double> && first < last) {
        // The saved lse is float32; float64 recomputes it in double.
        std::vector<A> mr(m, kNegInf<A>), lr(m, A(0));
        for (int64_t blk = first; blk < last; ++blk) {
          gemm<A, false>(m, kBlockN, D, Q, Dp, w.kt.data() + (blk - kb0) * D * kBlockN, kBlockN, Sb,
                         kBlockN, false);
          for (int64_t r = 0; r < m; ++r) {
            A* s = Sb + r * kBlockN;
            score_row(p, b, h, i0 + r, blk * kBlockN, s, static_cast<A*>(nullptr),
                      w.mbuf.data());
            online_row(s, kBlockN, mr[r], lr[r]);
          }
        }
        for (int64_t r = 0; r < m; ++r) {
          w.lse[r] = lr[r] == A(0) ? kNegInf<A> : mr[r] + std::log(lr[r]);
        }
      }
      // As in the forward: the block's keys from `ncols` on are masked for every row of the
      // tile, so their P and dS are 0 and the products stop there.
      int64_t lo_last, hi_last;
      key_range(p, i0 + m - 1, lo_last, hi_last);
      for (int64_t blk = first; blk < last; ++blk) {
        const int64_t j0 = blk * kBlockN, nval = std::min(kBlockN, p.S - j0);
        const int64_t ncols = round_up(std::clamp<int64_t>(hi_last - j0, 1, kBlockN),
                                       static_cast<int64_t>(V::size()));
        gemm<A, false>(m, ncols, D, Q, Dp, w.kt.data() + (blk - kb0) * D * kBlockN, kBlockN,
                       Sb, kBlockN, false);
        for (int64_t r = 0; r < m; ++r) {
          A* s = Sb + r * kBlockN;
          A* t = softcap ? w.t.data() + r * kBlockN : nullptr;
          score_row(p, b, h, i0 + r, j0, s, t, w.mbuf.data());
          const A lse = w.lse[r];
          if (lse == kNegInf<A>) {
            std::fill(s, s + ncols, A(0));
          } else {
            exp_row(s, ncols, lse);  // the sum is not needed here
          }
          A* pd = PD + r * kBlockN;
          if (dropout) {
            A* kf = w.kf.data() + r * kBlockN;
            const uint64_t base = drop_index(p, b, h, i0 + r, j0);
            for (int64_t c = 0; c < ncols; ++c) {
              kf[c] = c < nval && dropout_keep(p.seed, base + c, threshold) ? drop_scale : A(0);
              pd[c] = s[c] * kf[c];
            }
          }
        }
        const A* P = dropout ? PD : Sb;
        // dV += P^T dO
        gemm<A, true>(ncols, Dvp, m, P, kBlockN, G, Dvp, w.dv.data() + (j0 - jb) * Dvp, Dvp,
                      true);
        // dP = dO V^T
        gemm<A, false>(m, ncols, Dv, G, Dvp, w.vt.data() + (blk - kb0) * Dv * kBlockN, kBlockN, DS,
                       kBlockN, false);
        for (int64_t r = 0; r < m; ++r) {
          const A* pr = Sb + r * kBlockN;
          A* ds = DS + r * kBlockN;
          const V vd(w.delta[r]);
          for (int64_t c = 0; c < ncols; c += V::size()) {
            V dp = V::loadu(ds + c);
            if (dropout) dp = dp * V::loadu(w.kf.data() + r * kBlockN + c);
            (V::loadu(pr + c) * (dp - vd)).store(ds + c);
          }
          if (p.dmask != nullptr) {
            std::fill(ds + ncols, ds + kBlockN, A(0));
            const int64_t off = ((b * p.Hq + h) * p.L + i0 + r) * p.S + j0;
            std::memcpy(static_cast<A*>(p.dmask) + off, ds, nval * sizeof(A));
          }
          if (softcap) {
            const A* t = w.t.data() + r * kBlockN;
            for (int64_t c = 0; c < ncols; c += V::size()) {
              const V th = V::loadu(t + c);
              (V::loadu(ds + c) * (V(A(1)) - th * th)).store(ds + c);
            }
          }
        }
        // dQ += dS K, dK += dS^T Q
        gemm<A, false>(m, Dp, ncols, DS, kBlockN, w.kr.data() + (j0 - jb) * Dp, Dp, dQ, Dp,
                       true);
        gemm<A, true>(ncols, Dp, m, DS, kBlockN, Q, Dp, w.dk.data() + (j0 - jb) * Dp, Dp,
                      true);
      }
      for (int64_t r = 0; r < m; ++r) {
        row_scale(dQ + r * Dp, D, scale);  // dQ = scale dS' K
        if (p.chunks == 1) {
          store_any(dQ + r * Dp, D, p.dq, p.dtype,
                    b * p.sdq[0] + h * p.sdq[1] + (i0 + r) * p.sdq[2], p.sdq[3]);
        } else {
          A* part = static_cast<A*>(p.dq_part) + (((chunk * p.B + b) * p.Hq + h) * p.L + i0 + r) * D;
          std::copy(dQ + r * Dp, dQ + r * Dp + D, part);
        }
      }
    }
  }
  for (int64_t j = jb; j < je; ++j) {
    store_any(w.dk.data() + (j - jb) * Dp, D, p.dk, p.dtype,
              b * p.sdk[0] + hk * p.sdk[1] + j * p.sdk[2], p.sdk[3]);
    store_any(w.dv.data() + (j - jb) * Dvp, Dv, p.dv, p.dtype,
              b * p.sdv[0] + hk * p.sdv[1] + j * p.sdv[2], p.sdv[3]);
  }
}

template <typename A>
void bwd_heads(const AttentionParams& p, TaskQueue& tasks) {
  BwdBuffers<A> w;
  for (int64_t idx; tasks.pop(idx);) {
    const int64_t bh = idx / p.chunks;
    bwd_head(p, bh / p.Hk, bh % p.Hk, idx % p.chunks, w);
  }
}

// dq rows [begin, end) of (B, Hq, L): the chunks' parts added in chunk order (deterministic).
template <typename A>
void dq_reduce(const AttentionParams& p, int64_t begin, int64_t end) {
  const int64_t D = p.D, rows = p.B * p.Hq * p.L;
  std::vector<A> acc(std::max<int64_t>(D, 1));
  for (int64_t row = begin; row < end; ++row) {
    const A* part = static_cast<const A*>(p.dq_part) + row * D;
    std::copy(part, part + D, acc.begin());
    for (int64_t c = 1; c < p.chunks; ++c) {
      const A* more = part + c * rows * D;
      for (int64_t d = 0; d < D; ++d) acc[d] += more[d];
    }
    const int64_t i = row % p.L, bh = row / p.L, h = bh % p.Hq, b = bh / p.Hq;
    store_any(acc.data(), D, p.dq, p.dtype, b * p.sdq[0] + h * p.sdq[1] + i * p.sdq[2],
              p.sdq[3]);
  }
}

}  // namespace

void attention_fwd_tiles(const AttentionParams& p, TaskQueue& tasks) {
  p.acc_double ? fwd_tiles<double>(p, tasks) : fwd_tiles<float>(p, tasks);
}

void attention_bwd_heads(const AttentionParams& p, TaskQueue& tasks) {
  p.acc_double ? bwd_heads<double>(p, tasks) : bwd_heads<float>(p, tasks);
}

void attention_bwd_dq_reduce(const AttentionParams& p, int64_t begin, int64_t end) {
  p.acc_double ? dq_reduce<double>(p, begin, end) : dq_reduce<float>(p, begin, end);
}

}  // namespace fastattn::cpu::CPU_CAPABILITY
