// The CUDA launcher of the native attention kernels (attention_cuda.cuh's Launcher: launches on
// the current stream, the FASTATTN_CUDA_* switches, TMA tensor maps through the driver), and the
// launch logic's split by head dim: attention_cuda.cu (the ops) sees run_head_dim of each padded
// head dim declared extern here, and attention_cuda_d<kD>.cu compiles it with that head dim's
// kernels, so a build runs six smaller nvcc jobs in parallel rather than one of every kernel
// (which took 105 s for sm_90a, the longest job of the build).

#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <cstring>

#include "attention_cuda.cuh"

namespace fastattn::cuda {

// Whether the switch `var` is on: unset, or set to anything but "0" (read per call, so a process
// can compare the kernels on both sides of it).
inline bool switched_on(const char* var) {
  const char* env = std::getenv(var);
  return env == nullptr || std::strcmp(env, "0") != 0;
}

// Whether the Hopper forward, dQ and dK/dV kernels serve this device: compute capability 9.x,
// sm_90a code in the build (setup.py defines FASTATTN_SM90A when FASTATTN_CUDA_ARCHS lists
// 90a; the kernels' wgmma is compiled for sm_90a only and traps anywhere else), and
// FASTATTN_CUDA_WGMMA not "0" (read per call: the switch back to the sm_80 kernels, for
// comparing the two).
inline bool hopper_kernels(int device) {
#if defined(FASTATTN_SM90A)
  if (!switched_on("FASTATTN_CUDA_WGMMA")) return false;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major == 9;
#else
  (void)device;
  return false;
#endif
}

// cuTensorMapEncodeTiled, from the driver through the runtime's entry-point query (no link
// against libcuda), looked up once.
using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                                 const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                                 const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                                 CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

inline EncodeTiled encode_tiled() {
  static const EncodeTiled fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000,
                                                    cudaEnableDefault, &found));
#else
    C10_CUDA_CHECK(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault,
                                           &found));
#endif
    TORCH_CHECK(found == cudaDriverEntryPointSuccess && f != nullptr,
                "native CUDA attention: the driver has no cuTensorMapEncodeTiled (CUDA 12 or "
                "newer is needed for the Hopper TMA kernels; FASTATTN_CUDA_TMA=0 avoids it)");
    return reinterpret_cast<EncodeTiled>(f);
  }();
  return fn;
}

struct CudaLauncher {
  static bool wgmma() {
    int device = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    return hopper_kernels(device);
  }

  // Whether the Hopper kernels load their tiles by TMA (attention_fwd_tma_kernel from head dim
  // 64 up, attention_bwd_dq_tma_kernel and attention_bwd_dkdv_tma_kernel from 96 up) rather
  // than cp.async: FASTATTN_CUDA_TMA not "0" (read per call, for comparing the two).
  static bool tma() { return switched_on("FASTATTN_CUDA_TMA"); }

  // Whether the TMA forward's two consumer warpgroups take turns on the tensor cores (FA3's
  // ping-pong, head dims 64 to 128): FASTATTN_CUDA_PINGPONG not "0" (read per call, for
  // comparing the two).
  static bool turns() { return switched_on("FASTATTN_CUDA_PINGPONG"); }

  static void encode(CUtensorMap* map, const attention::TmaBox& t) {
    cuuint64_t dims[5], strides[4];
    cuuint32_t box[5], element_strides[5];
    for (int d = 0; d < 5; ++d) {
      dims[d] = t.dims[d];
      box[d] = t.box[d];
      element_strides[d] = 1;
      if (d < 4) strides[d] = t.strides[d];
    }
    const CUresult r = encode_tiled()(
        map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 5, const_cast<void*>(t.base), dims, strides, box,
        element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
        t.swizzle == 128  ? CU_TENSOR_MAP_SWIZZLE_128B
        : t.swizzle == 64 ? CU_TENSOR_MAP_SWIZZLE_64B
                          : CU_TENSOR_MAP_SWIZZLE_32B,
        CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    TORCH_CHECK(r == CUDA_SUCCESS, "native CUDA attention: cuTensorMapEncodeTiled failed (error ",
                static_cast<int>(r), ") for a tensor of dims [", t.dims[0], ", ", t.dims[1], ", ",
                t.dims[2], ", ", t.dims[3], ", ", t.dims[4], "]; FASTATTN_CUDA_TMA=0 avoids TMA");
  }

  // Raises the kernel's dynamic shared memory limit past the default 48 KB first (per call: the
  // attribute is per device, and cheap to set).
  template <typename Kernel, typename Params>
  static void launch(Kernel kernel, dim3 grid, int threads, size_t smem, const Params& p) {
    int device = 0, optin = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    TORCH_CHECK(smem <= static_cast<size_t>(optin), "native CUDA attention needs ", smem,
                " bytes of shared memory per block for this head dim; the device allows ", optin);
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    }
    kernel<<<grid, threads, smem, c10::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

namespace attention {

// The launch logic of each padded head dim (padded_head_dim) is compiled in its own
// attention_cuda_d<kD>.cu, which instantiates run_head_dim's forward and backward with
// FASTATTN_RUN_HEAD_DIM(template, kD); the extern declarations below tell every other file so.
// One macro, so the signature is spelled once for both.
#define FASTATTN_RUN_HEAD_DIM(how, kD)                                               \
  how void run_head_dim<CudaLauncher, true, kD>(at::ScalarType, const AttnParams&); \
  how void run_head_dim<CudaLauncher, false, kD>(at::ScalarType, const AttnParams&)

FASTATTN_RUN_HEAD_DIM(extern template, 32);
FASTATTN_RUN_HEAD_DIM(extern template, 64);
FASTATTN_RUN_HEAD_DIM(extern template, 96);
FASTATTN_RUN_HEAD_DIM(extern template, 128);
FASTATTN_RUN_HEAD_DIM(extern template, 192);
FASTATTN_RUN_HEAD_DIM(extern template, 256);

}  // namespace attention
}  // namespace fastattn::cuda
