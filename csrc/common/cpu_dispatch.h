// Run-time choice between the baseline, AVX2 and AVX-512 copies of a CPU kernel (see
// csrc/common/cpu_target.h for how the copies are built).
#pragma once

#include <cstdint>

// GCC on x86-64 builds the AVX2 and AVX-512 copies; other compilers and CPUs the baseline only.
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#define FASTATTN_X86_TARGETS 1
#else
#define FASTATTN_X86_TARGETS 0
#endif

namespace fastattn::cpu {

enum class Capability { kDefault, kAvx2, kAvx512 };

// The widest copy this CPU runs: PyTorch's choice (at::get_cpu_capability(), so the
// ATEN_CPU_CAPABILITY environment variable lowers it), limited to the copies this build holds.
Capability capability();

#if FASTATTN_X86_TARGETS
// Declares `ret name(args)` in the namespace of every copy: DEFAULT, AVX2, AVX512.
#define FASTATTN_DECLARE_CPU_KERNEL(ret, name, ...) \
  namespace DEFAULT { ret name(__VA_ARGS__); }      \
  namespace AVX2 { ret name(__VA_ARGS__); }         \
  namespace AVX512 { ret name(__VA_ARGS__); }

// The copy of kernel `name` for this CPU.
#define FASTATTN_CPU_KERNEL(name)                                                        \
  (::fastattn::cpu::capability() == ::fastattn::cpu::Capability::kAvx512 ? &::fastattn::cpu::AVX512::name \
   : ::fastattn::cpu::capability() == ::fastattn::cpu::Capability::kAvx2 ? &::fastattn::cpu::AVX2::name \
                                                                          : &::fastattn::cpu::DEFAULT::name)
#else
#define FASTATTN_DECLARE_CPU_KERNEL(ret, name, ...) \
  namespace DEFAULT { ret name(__VA_ARGS__); }
#define FASTATTN_CPU_KERNEL(name) (&::fastattn::cpu::DEFAULT::name)
#endif

}  // namespace fastattn::cpu
