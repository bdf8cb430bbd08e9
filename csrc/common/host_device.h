// FASTATTN_HOST_DEVICE marks plain functions that nvcc compiles for host and device alike; the
// host compiler of the CPU kernels (and the CUDA emulation) sees nothing.
#pragma once

#if defined(__CUDACC__)
#define FASTATTN_HOST_DEVICE __host__ __device__
#else
#define FASTATTN_HOST_DEVICE
#endif
