// Included first (before any other header) by a kernel translation unit compiled for one CPU
// capability: csrc/<op>/<op>_cpu_{default,avx2,avx512}.cpp define FASTATTN_CPU_TARGET to 0, 1
// or 2 and include this header, then the op's kernel header.
//
// Why per-file targets and not -march flags: the extension must run on any x86-64 CPU, so the
// library is compiled for the baseline and only these files use AVX2 / AVX-512, selected at
// run time by fastattn::cpu::capability() (csrc/common/cpu_dispatch.h) from PyTorch's own
// choice (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY). setuptools cannot give
// one source file its own flags, so the target comes from `#pragma GCC target`, which applies
// to everything defined after it in the file (ATen's Vectorized headers included).
//
// The names at::vec gives its vector types live in `inline namespace CPU_CAPABILITY`, and the
// kernels in fastattn::cpu::CPU_CAPABILITY, so the three copies never share a symbol. Inline
// functions from other headers (c10's scalar conversions, ...) can be emitted by several of
// these files; the linker keeps the first copy in link order, and setup.py links the baseline
// files first, then AVX2, then AVX-512, so code that may run on an older CPU never calls a
// copy compiled for a newer one.
//
// Only GCC on x86-64 builds the AVX2 / AVX-512 copies; elsewhere (clang, aarch64) those files
// compile to nothing and every CPU runs the baseline copy.
#pragma once

#if !defined(FASTATTN_CPU_TARGET)
#error "define FASTATTN_CPU_TARGET (0 default, 1 avx2, 2 avx512) before including cpu_target.h"
#endif

#include "cpu_dispatch.h"  // FASTATTN_X86_TARGETS; includes no ATen header

#if FASTATTN_CPU_TARGET == 0
#define CPU_CAPABILITY DEFAULT
#define FASTATTN_BUILD_KERNELS 1
#elif FASTATTN_CPU_TARGET == 1 && FASTATTN_X86_TARGETS
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#pragma GCC target("avx2,fma,f16c")
#define FASTATTN_ISA_AVX2 1
#define FASTATTN_BUILD_KERNELS 1
#elif FASTATTN_CPU_TARGET == 2 && FASTATTN_X86_TARGETS
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define FASTATTN_ISA_AVX2 1
#define FASTATTN_ISA_AVX512 1
#define FASTATTN_BUILD_KERNELS 1
#else
#define FASTATTN_BUILD_KERNELS 0
#endif

#if defined(FASTATTN_ISA_AVX2)
#ifndef __SSE3__
#define __SSE3__ 1
#endif
#ifndef __SSSE3__
#define __SSSE3__ 1
#endif
#ifndef __SSE4_1__
#define __SSE4_1__ 1
#endif
#ifndef __SSE4_2__
#define __SSE4_2__ 1
#endif
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#endif
#if defined(FASTATTN_ISA_AVX512)
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#endif
