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
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>

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

// Sum over the block of `v` (every thread gets the result). `scratch` holds 32 values.
template <typename A>
__device__ A block_sum(A v, A* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += shfl_xor(v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = (blockDim.x + 31) / 32;
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : A(0);
  for (int o = 16; o > 0; o >>= 1) v += shfl_xor(v, o);
  return v;
}

template <typename A>
__device__ MaxSum<A> block_max_sum(MaxSum<A> v, A* scratch_m, A* scratch_s) {
  for (int o = 16; o > 0; o >>= 1) {
    v = MaxSum<A>::merge(v, {shfl_xor(v.m, o), shfl_xor(v.s, o)});
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = (blockDim.x + 31) / 32;
  __syncthreads();
  if (lane == 0) {
    scratch_m[warp] = v.m;
    scratch_s[warp] = v.s;
  }
  __syncthreads();
  v = lane < warps ? MaxSum<A>{scratch_m[lane], scratch_s[lane]} : MaxSum<A>::empty();
  for (int o = 16; o > 0; o >>= 1) {
    v = MaxSum<A>::merge(v, {shfl_xor(v.m, o), shfl_xor(v.s, o)});
  }
  return v;
}

// Threads per block for rows of `cols` elements: enough that each thread handles a handful.
inline int threads_for(int64_t cols) {
  if (cols <= 256) return 64;
  if (cols <= 2048) return 128;
  if (cols <= 8192) return 256;
  return 512;
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

// Blocks for a grid-stride loop over `rows` rows, at most what the launcher asks for.
template <typename Launcher>
unsigned row_blocks(int64_t rows) {
  return static_cast<unsigned>(std::min<int64_t>(rows, Launcher::max_blocks()));
}

}  // namespace fastattn::cuda
