// Row-wise CUDA kernels' shared pieces: the row layout packed for the device (each tensor's
// 64-bit offset of row r, decoded from the leading dims once per row), element loads and
// stores of any of the four float dtypes converted to the accumulation type, the online
// (max, sum-of-exp) pair and block reductions. Argument checks are shared with the CPU
// launchers (csrc/common/checks.h and each op's <op>_args.h).
//
// The layout is csrc/common/rows.h's RowLayout (built on the host with the same rules as the
// CPU kernels: broadcast dims read through stride 0, the reduced dim through its own stride),
// copied into a fixed-size struct passed by value to the kernel.
//
// Under FASTATTN_CUDA_EMULATION (tests/cuda_emulation/) the device code here compiles as host
// C++ and the CUDA runtime parts (CudaRowLauncher) are left out.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#ifndef FASTATTN_CUDA_EMULATION
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

// A block's static shared array (the emulation makes it a function-local static).
#define FASTATTN_BLOCK_SHARED __shared__
// Prefixes a vector access statement; the hardware enforces the alignment itself, the
// emulation checks it.
#define FASTATTN_ALIGNED_ACCESS(ptr, bytes)
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "rows.h"

namespace fastattn::cuda {

constexpr int kMaxLeadingDims = 8;

// Element types, as codes the kernels switch on (the switch is uniform across a block).
enum DType : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3, kU8 = 4 };

inline DType dtype_code(c10::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kBool: return kU8;
    default: TORCH_CHECK(false, "fastattn: unsupported dtype ", t);
  }
}

struct DeviceRows {
  int ndim;                                       // leading dims
  int64_t sizes[kMaxLeadingDims];                 // leading sizes, outermost first
  int64_t strides[cpu::kMaxRowTensors][kMaxLeadingDims];
  int64_t col_stride[cpu::kMaxRowTensors];
  int64_t rows;
  int64_t cols;
};

inline DeviceRows pack_rows(const cpu::RowLayout& l) {
  TORCH_CHECK(static_cast<int>(l.sizes.size()) <= kMaxLeadingDims,
              "the CUDA row kernels take at most ", kMaxLeadingDims,
              " dims besides the reduced one, got ", l.sizes.size());
  DeviceRows d{};
  d.ndim = static_cast<int>(l.sizes.size());
  for (int i = 0; i < d.ndim; ++i) d.sizes[i] = l.sizes[i];
  for (int t = 0; t < cpu::kMaxRowTensors; ++t) {
    for (int i = 0; i < d.ndim; ++i) d.strides[t][i] = l.strides[t].empty() ? 0 : l.strides[t][i];
    d.col_stride[t] = l.col_stride[t];
  }
  d.rows = l.rows;
  d.cols = l.cols;
  return d;
}

// Offsets (elements) of row `row` in every tensor, and its index along the innermost leading
// dim (the query row of a causal mask).
struct RowOffsets {
  int64_t off[cpu::kMaxRowTensors];
  int64_t inner;
};

__device__ inline RowOffsets row_offsets(const DeviceRows& d, int64_t row) {
  RowOffsets r{};
  r.inner = 0;
  for (int i = d.ndim - 1; i >= 0; --i) {
    const int64_t idx = row % d.sizes[i];
    row /= d.sizes[i];
    if (i == d.ndim - 1) r.inner = idx;
#pragma unroll
    for (int t = 0; t < cpu::kMaxRowTensors; ++t) r.off[t] += idx * d.strides[t][i];
  }
  return r;
}

template <typename A>
__device__ inline A load_as(const void* base, int dtype, int64_t i) {
  switch (dtype) {
    case kF32: return static_cast<A>(static_cast<const float*>(base)[i]);
    case kF64: return static_cast<A>(static_cast<const double*>(base)[i]);
    case kF16: return static_cast<A>(static_cast<float>(static_cast<const c10::Half*>(base)[i]));
    case kBF16:
      return static_cast<A>(static_cast<float>(static_cast<const c10::BFloat16*>(base)[i]));
    default: return static_cast<A>(static_cast<const uint8_t*>(base)[i]);
  }
}

template <typename A>
__device__ inline void store_as(void* base, int dtype, int64_t i, A v) {
  switch (dtype) {
    case kF32: static_cast<float*>(base)[i] = static_cast<float>(v); break;
    case kF64: static_cast<double*>(base)[i] = static_cast<double>(v); break;
    case kF16: static_cast<c10::Half*>(base)[i] = c10::Half(static_cast<float>(v)); break;
    default: static_cast<c10::BFloat16*>(base)[i] = c10::BFloat16(static_cast<float>(v)); break;
  }
}

__device__ inline float exp_acc(float x) { return expf(x); }
__device__ inline double exp_acc(double x) { return exp(x); }
__device__ inline float log_acc(float x) { return logf(x); }
__device__ inline double log_acc(double x) { return log(x); }
__device__ inline float tanh_acc(float x) { return tanhf(x); }
__device__ inline double tanh_acc(double x) { return tanh(x); }

// Running max m and sum s of exp(z - m) over the values seen. Empty: m = -inf, s = 0. A value
// of -inf adds exp(-inf - m) = 0 and is skipped, so it can never make -inf - (-inf) = NaN; a
// NaN or +inf value makes s NaN (the whole row NaN, as torch.softmax).
template <typename A>
struct MaxSum {
  A m;
  A s;

  __device__ static MaxSum empty() { return {-INFINITY, A(0)}; }

  __device__ void add(A z) {
    if (z == -INFINITY) return;
    const A m_new = z > m ? z : m;  // NaN z: m stays, and s becomes NaN below
    s = s * exp_acc(m - m_new) + exp_acc(z - m_new);
    m = m_new;
  }

  __device__ static MaxSum merge(MaxSum a, MaxSum b) {
    if (a.m == -INFINITY && a.s == A(0)) return b;
    if (b.m == -INFINITY && b.s == A(0)) return a;
    const A m = a.m > b.m ? a.m : b.m;
    return {m, a.s * exp_acc(a.m - m) + b.s * exp_acc(b.m - m)};
  }
};

template <typename T>
__device__ inline T shfl_xor(T v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}

template <typename A>
__device__ inline A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += shfl_xor(v, o);
  return v;
}

template <typename A>
__device__ inline MaxSum<A> warp_max_sum(MaxSum<A> v) {
  for (int o = 16; o > 0; o >>= 1) {
    v = MaxSum<A>::merge(v, {shfl_xor(v.m, o), shfl_xor(v.s, o)});
  }
  return v;
}

// Sum over the block of `v` (every thread gets the result). `scratch` holds 32 values.
template <typename A>
__device__ A block_sum(A v, A* scratch) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = (blockDim.x + 31) / 32;
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : A(0);
  return warp_sum(v);
}

template <typename A>
__device__ MaxSum<A> block_max_sum(MaxSum<A> v, A* scratch_m, A* scratch_s) {
  v = warp_max_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = (blockDim.x + 31) / 32;
  __syncthreads();
  if (lane == 0) {
    scratch_m[warp] = v.m;
    scratch_s[warp] = v.s;
  }
  __syncthreads();
  v = lane < warps ? MaxSum<A>{scratch_m[lane], scratch_s[lane]} : MaxSum<A>::empty();
  return warp_max_sum(v);
}

// The same over the `nt` threads that share a row: a warp (no block barrier, so the warps of a
// block may work on different rows) or the whole block.
template <typename A>
__device__ inline A row_sum(A v, int nt, A* scratch) {
  return nt == 32 ? warp_sum(v) : block_sum(v, scratch);
}

template <typename A>
__device__ inline MaxSum<A> row_max_sum(MaxSum<A> v, int nt, A* scratch_m, A* scratch_s) {
  return nt == 32 ? warp_max_sum(v) : block_max_sum(v, scratch_m, scratch_s);
}

// The rows this thread's group (`nt` threads: a warp or the block) works on, in a grid-stride
// loop, and the thread's index within the group.
struct RowGroup {
  int64_t first;
  int64_t step;
  int t;
  int nt;
};

__device__ inline RowGroup row_group(int nt) {
  const int per_block = blockDim.x / nt;
  return {static_cast<int64_t>(blockIdx.x) * per_block + threadIdx.x / nt,
          static_cast<int64_t>(gridDim.x) * per_block, static_cast<int>(threadIdx.x) % nt, nt};
}

// Element access to one row, for kernels written once for every layout. `each<kIn>` calls
// f(j, x0_j, x1_j) for the columns j this thread takes (thread t of nt; x1 is 0 unless kIn is
// 2); `map<kIn>` also writes f's result to the output's column j.

// Any dtype (runtime codes) and any column strides: one element at a time.
struct StridedRow {
  const void* in[2];
  int in_dtype[2];
  int64_t in_off[2];
  int64_t in_stride[2];
  void* out;
  int out_dtype;
  int64_t out_off;
  int64_t out_stride;

  template <int kIn, typename A>
  __device__ A load(int i, int64_t j) const {
    if (kIn <= i) return A(0);
    return load_as<A>(in[i], in_dtype[i], in_off[i] + j * in_stride[i]);
  }

  template <int kIn, typename A, typename F>
  __device__ void each(int64_t C, int t, int nt, F f) const {
    for (int64_t j = t; j < C; j += nt) f(j, load<kIn, A>(0, j), load<kIn, A>(1, j));
  }

  template <int kIn, typename A, typename F>
  __device__ void map(int64_t C, int t, int nt, F f) const {
    for (int64_t j = t; j < C; j += nt) {
      store_as(out, out_dtype, out_off + j * out_stride, f(j, load<kIn, A>(0, j),
                                                           load<kIn, A>(1, j)));
    }
  }
};

// 16 bytes of T.
template <typename T>
struct alignas(16) Vec {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

template <typename A, typename T>
__device__ inline A widen(T x) {
  if constexpr (sizeof(T) == 2) {
    return static_cast<A>(static_cast<float>(x));
  } else {
    return static_cast<A>(x);
  }
}

template <typename T, typename A>
__device__ inline T narrow(A x) {
  if constexpr (sizeof(T) == 2) {
    return T(static_cast<float>(x));
  } else {
    return static_cast<T>(x);
  }
}

// Tensors of one element type T whose rows start at the same offset `off`, with unit column
// stride and 16-byte aligned data pointers: 16-byte loads and stores over the aligned middle of
// the row, one element at a time for the few before it and after the last whole vector.
template <typename T>
struct VecRow {
  static constexpr int N = Vec<T>::N;
  const T* in[2];
  T* out;
  int64_t off;

  __device__ int64_t head(int64_t C) const { return std::min<int64_t>(C, (N - off % N) % N); }

  template <int kIn, typename A>
  __device__ A load(int i, int64_t j) const {
    return kIn <= i ? A(0) : widen<A>(in[i][off + j]);
  }

  template <int kIn>
  __device__ Vec<T> load_vec(int i, int64_t j) const {
    Vec<T> v;
    if (kIn > i) {
      FASTATTN_ALIGNED_ACCESS(in[i] + off + j, 16)
      v = *reinterpret_cast<const Vec<T>*>(in[i] + off + j);
    }
    return v;
  }

  template <int kIn, typename A, typename F>
  __device__ void each(int64_t C, int t, int nt, F f) const {
    const int64_t h = head(C), nvec = (C - h) / N, tail = h + nvec * N;
    for (int64_t j = t; j < h; j += nt) f(j, load<kIn, A>(0, j), load<kIn, A>(1, j));
    for (int64_t i = t; i < nvec; i += nt) {
      const int64_t j = h + i * N;
      const Vec<T> v0 = load_vec<kIn>(0, j), v1 = load_vec<kIn>(1, j);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        f(j + k, widen<A>(v0.v[k]), kIn > 1 ? widen<A>(v1.v[k]) : A(0));
      }
    }
    for (int64_t j = tail + t; j < C; j += nt) f(j, load<kIn, A>(0, j), load<kIn, A>(1, j));
  }

  template <int kIn, typename A, typename F>
  __device__ void map(int64_t C, int t, int nt, F f) const {
    const int64_t h = head(C), nvec = (C - h) / N, tail = h + nvec * N;
    for (int64_t j = t; j < h; j += nt) {
      out[off + j] = narrow<T>(f(j, load<kIn, A>(0, j), load<kIn, A>(1, j)));
    }
    for (int64_t i = t; i < nvec; i += nt) {
      const int64_t j = h + i * N;
      const Vec<T> v0 = load_vec<kIn>(0, j), v1 = load_vec<kIn>(1, j);
      Vec<T> o;
#pragma unroll
      for (int k = 0; k < N; ++k) {
        o.v[k] = narrow<T>(f(j + k, widen<A>(v0.v[k]), kIn > 1 ? widen<A>(v1.v[k]) : A(0)));
      }
      FASTATTN_ALIGNED_ACCESS(out + off + j, 16)
      *reinterpret_cast<Vec<T>*>(out + off + j) = o;
    }
    for (int64_t j = tail + t; j < C; j += nt) {
      out[off + j] = narrow<T>(f(j, load<kIn, A>(0, j), load<kIn, A>(1, j)));
    }
  }
};

// VecRow with the row kept in registers: the first each() reads the row from memory into up to
// kVecs vectors per thread (and the one head and one tail element a thread may have), later
// each() and map() calls read the registers, so a kernel reads the row from memory once. The
// launcher guarantees the row fits: ceil(C / N) <= kVecs * nt (head and tail are shorter than
// a vector, and nt >= 32 >= N). Every register index is a compile-time constant after unrolling,
// so the arrays stay in registers.
template <typename T, int kVecs>
struct ResidentRow {
  static constexpr int N = Vec<T>::N;
  VecRow<T> row;
  Vec<T> v0[kVecs], v1[kVecs];
  T h0, h1, t0, t1;
  bool loaded = false;

  template <int kIn, typename A>
  __device__ A load(int i, int64_t j) const {
    return row.template load<kIn, A>(i, j);
  }

  template <int kIn, typename A, typename F>
  __device__ void each(int64_t C, int t, int nt, F f) {
    visit<kIn, A, false>(C, t, nt, f);
  }

  template <int kIn, typename A, typename F>
  __device__ void map(int64_t C, int t, int nt, F f) {
    visit<kIn, A, true>(C, t, nt, f);
  }

 private:
  template <int kIn, typename A, bool kWrite, typename F>
  __device__ void visit(int64_t C, int t, int nt, F f) {
    const int64_t h = row.head(C), nvec = (C - h) / N, tail = h + nvec * N;
    const bool load_now = !loaded;
    auto one = [&](int64_t j, T& c0, T& c1) {
      if (load_now) {
        c0 = kIn > 0 ? row.in[0][row.off + j] : T();
        c1 = kIn > 1 ? row.in[1][row.off + j] : T();
      }
      if constexpr (kWrite) {
        row.out[row.off + j] = narrow<T>(f(j, widen<A>(c0), kIn > 1 ? widen<A>(c1) : A(0)));
      } else {
        f(j, widen<A>(c0), kIn > 1 ? widen<A>(c1) : A(0));
      }
    };
    if (t < h) one(t, h0, h1);
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
      const int64_t i = t + static_cast<int64_t>(k) * nt;
      if (i < nvec) {
        const int64_t j = h + i * N;
        if (load_now) {
          v0[k] = row.template load_vec<kIn>(0, j);
          v1[k] = row.template load_vec<kIn>(1, j);
        }
        Vec<T> o;
#pragma unroll
        for (int e = 0; e < N; ++e) {
          const A x0 = widen<A>(v0[k].v[e]), x1 = kIn > 1 ? widen<A>(v1[k].v[e]) : A(0);
          if constexpr (kWrite) {
            o.v[e] = narrow<T>(f(j + e, x0, x1));
          } else {
            f(j + e, x0, x1);
          }
        }
        if constexpr (kWrite) {
          FASTATTN_ALIGNED_ACCESS(row.out + row.off + j, 16)
          *reinterpret_cast<Vec<T>*>(row.out + row.off + j) = o;
        }
      }
    }
    if (tail + t < C) one(tail + t, t0, t1);
    loaded = true;
  }
};

// Whether the tensors qualify for VecRow: one dtype, the reduced dim last and every tensor
// contiguous (so row r starts at r * cols in each), 16-byte aligned data pointers.
inline bool vec_rows_ok(const std::vector<const at::Tensor*>& tensors, int64_t dim) {
  const at::Tensor& first = *tensors.front();
  for (const at::Tensor* t : tensors) {
    if (t->scalar_type() != first.scalar_type() || dim != t->dim() - 1 || !t->is_contiguous() ||
        reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0) {
      return false;
    }
  }
  return true;
}

// Threads per block for rows of `cols` elements: enough that each thread handles a handful.
inline int threads_for(int64_t cols) {
  if (cols <= 256) return 64;
  if (cols <= 2048) return 128;
  if (cols <= 8192) return 256;
  return 512;
}

// Block size and threads per row: a warp per row (four rows a block) for VecRow rows where
// each lane has at most four 16-byte vectors to read, else a block per row.
struct RowGrid {
  int threads;
  int per_row;
};

inline RowGrid row_grid(int64_t cols, int64_t elem_size, bool vec) {
  if (vec && cols * elem_size <= 32 * 4 * 16) return {128, 32};
  const int threads = threads_for(cols);
  return {threads, threads};
}

// The most threads a row kernel's block has (their __launch_bounds__): 512 leaves a thread 128
// registers, room for a ResidentRow's vectors without spilling.
constexpr int kMaxRowThreads = 512;

// The grid for ResidentRow<T, kVecs> rows when they fit in registers ({0, 0} if not): row_grid's
// block grown until ceil(cols / N) vectors take at most kVecs per thread, up to kMaxRowThreads.
inline RowGrid resident_grid(int64_t cols, int64_t elem_size, int vecs_per_thread) {
  const RowGrid grid = row_grid(cols, elem_size, true);
  const int64_t per_vec = 16 / elem_size, vecs = (cols + per_vec - 1) / per_vec;
  if (grid.per_row == 32) return grid;  // at most four vectors a lane
  const int64_t need = (vecs + vecs_per_thread - 1) / vecs_per_thread;
  const int64_t threads = std::max<int64_t>(grid.threads, (need + 31) / 32 * 32);
  if (threads > kMaxRowThreads) return {0, 0};
  return {static_cast<int>(threads), static_cast<int>(threads)};
}

#ifndef FASTATTN_CUDA_EMULATION
// Launches the row kernels on the current stream of the current device; the launch logic of
// each op (<op>_cuda.cuh) is written against this interface, which the emulation also provides.
struct CudaRowLauncher {
  // Blocks for a grid-stride loop over rows: enough to fill every SM many times over.
  static unsigned max_blocks() {
    int device = 0, sms = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return static_cast<unsigned>(sms) * 32;
  }

  template <typename Args>
  static void launch(void (*kernel)(Args), unsigned blocks, int threads, const Args& a) {
    kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};
#endif

// Blocks for a grid-stride loop over `rows` rows, `grid.threads / grid.per_row` rows a block, at
// most what the launcher asks for.
template <typename Launcher>
unsigned row_blocks(int64_t rows, const RowGrid& grid) {
  const int64_t per_block = grid.threads / grid.per_row;
  return static_cast<unsigned>(
      std::min<int64_t>((rows + per_block - 1) / per_block, Launcher::max_blocks()));
}

}  // namespace fastattn::cuda
